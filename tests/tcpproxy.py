"""A TCP load balancer in front of the aggregator's replicas, as a Kubernetes Service is: it passes TLS through
untouched (mutual TLS stays end to end), spreads connections over the backends and skips one that refuses."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading

from fedsilo.netutil import free_port


class TcpProxy:
    def __init__(self, backends: list[int], host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port()
        self.backends = list(backends)  # may be changed while it runs (a pod leaving the Service)
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, self.host, self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, backends = next(self._turn), list(self.backends)
        for i in range(len(backends)):
            port = backends[(first + i) % len(backends)]
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(self.host, port), 1.0)
            except (OSError, TimeoutError):
                continue
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            return
        writer.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
