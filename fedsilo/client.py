"""A small synchronous client of the aggregator's operator API, for the CLI and the local launcher.

Every way a call can fail becomes a `ClientError` whose message is one line naming the URL and the cause (connection
refused, a certificate the CA does not vouch for, an operator certificate the aggregator does not accept, an HTTP
error with the aggregator's reason), so the CLI never shows a traceback for a misconfiguration.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from fedsilo.errors import FedsiloError


class ClientError(FedsiloError):
    """A call to the aggregator failed; the message is one line an operator can act on."""


class AggregatorUnreachableError(ClientError):
    """No answer from the aggregator: nothing listening, wrong scheme or port, TLS refused, timeout."""


class ApiError(ClientError):
    """The aggregator answered with an HTTP error."""

    def __init__(self, status: int, body: dict[str, Any], url: str = "") -> None:
        self.status, self.body, self.url = status, body, url
        detail = body.get("detail") or body
        hint = ""
        if status == 401:
            hint = " (give the operator certificate with --cert/--key or FEDSILO_CERT/FEDSILO_KEY)"
        elif status == 403:
            hint = " (this identity may not do that: an admin operator certificate is needed)"
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status} {body.get('error', '')}{where}: {detail}{hint}")


def _cause(exc: BaseException) -> str:
    """The reason behind a failed connection, in words (the innermost, most specific one)."""
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({reason.verify_message}): is --ca / FEDSILO_CA the "
                "federation's ca.crt?")
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason}): is the operator certificate from this federation's CA?"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the aggregator running, on this host and port?)"
    if isinstance(reason, TimeoutError):
        return "no answer in time (timeout)"
    if isinstance(reason, http.client.RemoteDisconnected | http.client.BadStatusLine):
        return "it closed the connection without an HTTP answer (https:// URL for an HTTPS server?)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


class AggregatorClient:
    def __init__(
        self, base_url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30, token: str | None = None
    ) -> None:
        self.base = base_url.rstrip("/")
        self._ssl = ssl_context
        self._timeout = timeout
        self._token = token

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self._token is not None:
            req.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                data = resp.read()
                content_type = resp.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": "http_error", "detail": raw.decode(errors="replace")[:500]}
            if not isinstance(parsed, dict):
                parsed = {"error": "http_error", "detail": str(parsed)[:500]}
            raise ApiError(exc.code, parsed, self.base) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise AggregatorUnreachableError(f"cannot reach the aggregator at {self.base}: {_cause(exc)}") from None
        if data and content_type == "application/json":
            try:
                return json.loads(data)
            except ValueError:
                raise ClientError(f"the aggregator at {self.base} sent invalid JSON for {method} {path}") from None
        return data

    def submit(self, job_yaml: str) -> str:
        return str(self.request("POST", "/api/v1/jobs", job_yaml.encode(), "application/yaml")["job_id"])

    def job(self, job_id: str, per_site: bool = True) -> dict[str, Any]:
        """The job's summary; without `per_site`, each site's detail is left out (a poll of a large federation)."""
        query = "" if per_site else "?sites=none"
        result: dict[str, Any] = self.request("GET", f"/api/v1/jobs/{job_id}{query}")
        return result

    def jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/jobs")
        return result

    def sites(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/sites")
        return result

    def decisions(self, site: str | None = None) -> list[dict[str, Any]]:
        query = f"?site={site}" if site is not None else ""
        result: list[dict[str, Any]] = self.request("GET", f"/api/v1/decisions{query}")
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/api/v1/jobs/{job_id}/cancel", b"")
        return result

    def pause(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/api/v1/jobs/{job_id}/pause", b"")
        return result

    def resume(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/api/v1/jobs/{job_id}/resume", b"")
        return result

    def healthy(self) -> bool:
        try:
            self.request("GET", "/healthz")
            return True
        except ClientError:
            return False
