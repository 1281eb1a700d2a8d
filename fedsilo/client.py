"""A small synchronous client of the aggregator's operator API, for the CLI and the demo."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body
        detail = body.get("detail") or body
        super().__init__(f"HTTP {status} {body.get('error', '')}: {detail}")


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
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": "http_error", "detail": raw.decode(errors="replace")[:500]}
            raise ApiError(exc.code, parsed) from None
        return json.loads(data) if data and resp.headers.get_content_type() == "application/json" else data

    def submit(self, job_yaml: str) -> str:
        return str(self.request("POST", "/api/v1/jobs", job_yaml.encode(), "application/yaml")["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/api/v1/jobs/{job_id}")
        return result

    def jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/jobs")
        return result

    def sites(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/sites")
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
        except (OSError, ApiError):
            return False
