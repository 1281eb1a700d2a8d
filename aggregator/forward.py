"""Requests about a job go to the replica that writes it: any other replica forwards them there.

With several aggregator replicas behind one Kubernetes Service, a site's upload (or an operator's cancel) lands on
any of them, but only the job's writer (the holder of its lease, `aggregator.leases`) may change the job. Forwarding
was chosen over storing the upload where it landed and letting the writer fold it in later: an acknowledgement then
keeps its one meaning — the update is durable *and* counted in its round — and agents need no change. The
forwarding replica connects to the writer's advertised address over mutual TLS with its own aggregator certificate
and names the original caller in a header that the writer believes from an aggregator certificate only. A request is
forwarded at most once; a writer that cannot be reached is a 503 the caller retries (its lease expires within
`lease_ttl_s` and another replica takes the job over).
"""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from aggregator.store.leases import Lease
from federation.transport import TLSConfig

log = structlog.get_logger(__name__)
FORWARDED_SITE = "X-Fedsilo-Forwarded-Site"  # the site a forwarded request came from
FORWARDED_OPERATOR = "X-Fedsilo-Forwarded-Operator"  # "<name> <role>" of a forwarded operator request
PASSED_HEADERS = ("Content-Type", "X-Fedsilo-Envelope")


class Forwarder:
    def __init__(self, tls: TLSConfig, timeout_s: float = 60.0) -> None:
        self._tls = tls
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._tls.client_context(), limit=64)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def to_writer(self, request: web.Request, lease: Lease, body: bytes, caller: tuple[str, str]) -> web.Response:
        """Send `request` (its body already read) to the job's writer as `caller` (kind, identity): ("site", name)
        or ("operator", "<name> <role>"), and answer with what the writer answered."""
        headers = {h: request.headers[h] for h in PASSED_HEADERS if h in request.headers}
        headers[FORWARDED_SITE if caller[0] == "site" else FORWARDED_OPERATOR] = caller[1]
        url = lease.address.rstrip("/") + request.path_qs
        try:
            async with self._client().request(request.method, url, data=body, headers=headers) as resp:
                answer = await resp.read()
                log.info("request_forwarded", to=lease.holder, path=request.path, status=resp.status)
                return web.Response(status=resp.status, body=answer,
                                    content_type=resp.content_type or "application/json")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("forward_failed", to=lease.holder, address=lease.address, error=str(exc)[:300])
            response = web.json_response(
                {"error": "writer_unreachable", "detail": f"this job's writer ({lease.holder}) cannot be reached; "
                 "retry (another replica takes the job over when its lease expires)"}, status=503)
            response.headers["Retry-After"] = "1"
            return response

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
