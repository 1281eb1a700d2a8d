"""Text that leaves the hospital names its datasets by their id, never by where they are kept.

Refusal reasons and error messages are written for the site's own staff and name the data file (`data file
/srv/ehr/exports/cardiology-2024.csv does not exist`): the local audit log keeps them so. A copy sent to the
aggregator (and so to the operator's console) would tell every operator the hospital's file layout, so the egress
gate rewrites each reason on its way out: a dataset's file (and its folder) becomes `[dataset NAME]`, and any other
absolute path (from a library's error message, say) becomes `[local path]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from federation.bounds import MAX_TEXT

# An absolute POSIX path (not the tail of a URL or of a fraction such as 1/3), a home-relative path, or a Windows one.
_ABSOLUTE = re.compile(r"(?<![\w.:/~\]])(?:~?/|[A-Za-z]:[\\/])[^\s'\"`,;()\[\]{}<>|]+")


class OffsiteText:
    def __init__(self, datasets: Mapping[str, Path]) -> None:
        known: dict[str, str] = {}
        for name, path in datasets.items():
            label = f"[dataset {name}]"
            for form in {str(path), str(path.resolve())}:
                known[form] = label
                known.setdefault(str(Path(form).parent), f"[folder of dataset {name}]")
        known.pop("/", None)
        # Longest first, so that a file is replaced before its folder.
        self._known = sorted(known.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for raw, label in self._known:
            text = text.replace(raw, label)
        return _ABSOLUTE.sub("[local path]", text)[:MAX_TEXT]
