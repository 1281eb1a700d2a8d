"""The example site policies as tests load them: pointed at a test's own data files, privacy settings changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.policy import SitePolicy

EXAMPLES = Path(__file__).resolve().parents[1] / "policies" / "examples"


def site_policy(site: str, files: dict[str, Path], **privacy: Any) -> SitePolicy:
    """`site`'s example policy reading `files[site]` for heart-disease, its privacy section updated with `privacy`."""
    p = SitePolicy.load(EXAMPLES / f"{site}.yaml")
    ds = p.datasets["heart-disease"].model_copy(update={"path": files[site]})
    return p.model_copy(update={"datasets": {"heart-disease": ds}, "privacy": p.privacy.model_copy(update=privacy)})
