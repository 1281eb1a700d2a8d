"""A faulty S3 endpoint for the blob store's tests: an HTTP proxy in front of moto's server that answers the next
requests with the failures S3 really sends (503 SlowDown, 500 InternalError, 409 ConditionalRequestConflict), a
body cut short, or a stall, and forwards everything else. moto has no fault injection of its own in server mode.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

Fault = Literal["slowdown", "internal", "conflict", "truncate", "stall"]
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "expect", "te", "upgrade"}
ERRORS: dict[str, tuple[int, str, str]] = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "conflict": (409, "ConditionalRequestConflict", "A conflicting conditional operation is in progress."),
}


@dataclass
class Injected:
    fault: Fault
    method: str | None  # only requests with this method; None: any


class FaultyS3Proxy:
    """`inject(fault, times, method)` queues faults; each matching request consumes one. `requests` counts what
    reached the proxy, by method; `faulted` how many were answered with a fault."""

    def __init__(self, upstream: str, stall_s: float = 2.0) -> None:
        self.upstream = urlsplit(upstream)
        self.stall_s = stall_s
        self.requests: dict[str, int] = {}
        self.faulted = 0
        self._faults: deque[Injected] = deque()
        self._always: Injected | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as botocore expects of S3

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                fault = proxy._take(self.command)
                if fault is not None and fault.fault in ERRORS:
                    self._error(*ERRORS[fault.fault])
                    return
                if fault is not None and fault.fault == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                status, headers, data = proxy._forward(self.command, self.path, dict(self.headers.items()), body)
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_HEADERS and k.lower() not in ("server", "date"):
                        self.send_header(k, v)
                length = headers_length(headers) if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if fault is not None and fault.fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])  # then hang up: the client sees a body cut short
                    self.wfile.flush()
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def _error(self, status: int, code: str, message: str) -> None:
                data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                        f"</Message><RequestId>FAULT</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, fault: Fault, times: int = 1, method: str | None = None) -> None:
        with self._lock:
            self._faults.extend(Injected(fault, method) for _ in range(times))

    def always(self, fault: Fault | None, method: str | None = None) -> None:
        """Answer every matching request with `fault` until called with None."""
        with self._lock:
            self._always = None if fault is None else Injected(fault, method)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._always = None
            self.requests.clear()
            self.faulted = 0

    def _take(self, method: str) -> Injected | None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1
            found = self._always if self._always is not None and self._always.method in (None, method) else None
            if found is None:
                found = next((f for f in self._faults if f.method in (None, method)), None)
                if found is not None:
                    self._faults.remove(found)
            if found is not None:
                self.faulted += 1
            return found

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname or "127.0.0.1", self.upstream.port, timeout=30)
        try:
            conn.request(method, path, body=body if body or method in ("PUT", "POST") else None,
                         headers={k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


def headers_length(headers: list[tuple[str, str]]) -> int:
    return int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
