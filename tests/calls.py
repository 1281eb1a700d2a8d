"""One HTTPS call to a local federation's aggregator with a TLS context of the test's choosing (another CA, no
certificate, a revoked one) and optionally a bearer token: the status and the parsed JSON answer, errors included."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from fedsilo.local import LocalFederation


def https(fed: LocalFederation, path: str, ctx: ssl.SSLContext, body: bytes | None = None,
          token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(fed.url + path, data=body, method="POST" if body is not None else "GET")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
