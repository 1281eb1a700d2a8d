"""A counting TCP relay: what a site really puts on the wire, TLS records and all.

Each site's agent is pointed at its own relay ports (one in front of the broker, one in front of the aggregator)
and its egress allowlist names those ports, so every byte a site sends or receives over MQTT and HTTPS passes a
socket we count, handshakes included. The relay runs an asyncio loop in a daemon thread of the benchmark.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import structlog

from fedsilo.netutil import free_port

log = structlog.get_logger("bench.wire")
CHUNK = 1 << 16


@dataclass
class Counter:
    """Bytes each way and connections accepted on one relay port."""

    upstream: int = 0  # client (agent) → server
    downstream: int = 0  # server → client
    connections: int = 0

    @property
    def total(self) -> int:
        return self.upstream + self.downstream

    def snapshot(self) -> Counter:
        return Counter(self.upstream, self.downstream, self.connections)

    def __sub__(self, other: Counter) -> Counter:
        return Counter(self.upstream - other.upstream, self.downstream - other.downstream,
                       self.connections - other.connections)


@dataclass
class Route:
    name: str
    target_port: int
    port: int = field(default_factory=free_port)
    counter: Counter = field(default_factory=Counter)


class Relay:
    """Plain byte relays on 127.0.0.1, one per `Route`, counting both directions."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._servers: list[asyncio.Server] = []

    def add(self, name: str, target_port: int) -> Route:
        route = Route(name, target_port)
        self.routes[name] = route
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._listen(route), self._loop).result(10)
        return route

    def start(self) -> None:
        self._thread.start()
        for route in self.routes.values():
            asyncio.run_coroutine_threadsafe(self._listen(route), self._loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def snapshot(self) -> dict[str, Counter]:
        return {name: r.counter.snapshot() for name, r in self.routes.items()}

    async def _listen(self, route: Route) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            route.counter.connections += 1
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", route.target_port)
            except OSError as exc:
                log.warning("relay_connect_failed", route=route.name, error=str(exc))
                writer.close()
                return
            await asyncio.gather(_pump(reader, up_w, route.counter, True), _pump(up_r, writer, route.counter, False))

        self._servers.append(await asyncio.start_server(handle, "127.0.0.1", route.port))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter, up: bool) -> None:
    try:
        while data := await reader.read(CHUNK):
            if up:
                counter.upstream += len(data)
            else:
                counter.downstream += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
