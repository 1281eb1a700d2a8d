"""The AWS edge for the tracking tests: moto's server mode on a free loopback port, and a small HTTP proxy in
front of it that records every SageMaker request the SDK sends and can answer ThrottlingException instead.

moto does not implement BatchGetMetrics, so per-step metric values cannot be read back from it: the proxy's
record of the BatchPutMetrics requests the SDK actually sent is where the tests read the series.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fedsilo.netutil import free_port, wait_port

REGION = "eu-west-1"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """`moto_server` (the real server mode) on a free port; yields its base URL."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    with (log_dir / "moto.log").open("ab") as log:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        if not wait_port("127.0.0.1", port, 30):
            raise RuntimeError(f"moto_server did not listen on {port}; see {log_dir / 'moto.log'}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class SageMakerProxy:
    """Forwards to moto, keeping (operation, JSON body) of each request; `throttle = True` answers every request
    with the service's ThrottlingException instead, as SageMaker does when an account's rate is exceeded."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.throttle = False
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.throttled = 0
        self.access_keys: set[str] = set()  # who signed the requests (SigV4 credential scope)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                # JSON protocol (sagemaker): the operation is a header; REST-JSON (sagemaker-metrics): the path.
                op = self.headers.get("X-Amz-Target", "").rpartition(".")[2] or self.path.strip("/").split("/")[0]
                if proxy.throttle:
                    with proxy._lock:
                        proxy.throttled += 1
                    data = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()
                    self._answer(400, {"Content-Type": "application/x-amz-json-1.1",
                                       "x-amzn-ErrorType": "ThrottlingException"}, data)
                    return
                auth = self.headers.get("Authorization", "")
                with proxy._lock:
                    proxy.calls.append((op, json.loads(body) if body else {}))
                    proxy.access_keys.add(auth.partition("Credential=")[2].partition("/")[0])
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command)
                for k, v in self.headers.items():
                    if k.lower() not in HOP_HEADERS:
                        req.add_header(k, v)
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        status, headers, data = resp.status, dict(resp.headers.items()), resp.read()
                except urllib.error.HTTPError as exc:
                    status, headers, data = exc.code, dict(exc.headers.items()), exc.read()
                self._answer(status, headers, data)

            do_PUT = do_POST

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in HOP_HEADERS and k.lower() not in ("server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> SageMakerProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def metric_series(self, trial_component: str) -> dict[str, dict[int, float]]:
        """name -> step -> value, from every BatchPutMetrics request sent for one run (trial component)."""
        out: dict[str, dict[int, float]] = {}
        with self._lock:
            calls = list(self.calls)
        for op, body in calls:
            if op == "BatchPutMetrics" and body["TrialComponentName"] == trial_component:
                for m in body["MetricData"]:
                    out.setdefault(m["MetricName"], {})[m["Step"]] = m["Value"]
        return out


def aws_env(sagemaker_url: str, moto_url: str) -> dict[str, str]:
    """What the aggregator process needs to find the stand-ins through the standard AWS configuration chain."""
    return {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_SAGEMAKER": sagemaker_url, "AWS_ENDPOINT_URL_SAGEMAKER_METRICS": sagemaker_url,
        "AWS_ENDPOINT_URL_STS": moto_url, "AWS_ENDPOINT_URL_S3": moto_url,
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
