"""Store and blob calls off the event loop, on threads of their own.

Writes run on one thread holding the store's single writer connection (which also makes the store single-writer);
reads for the API run on a second thread with a connection of their own, so an operator's status page never waits
behind the uploads' fsyncs, nor they behind a large status page. Blob writes, content-addressed and independent of
each other, run on a small pool of their own (`io`), so several uploads' fsyncs overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

from aggregator.store import StateStore

P = ParamSpec("P")
T = TypeVar("T")


class Db:
    def __init__(self, store: StateStore, reader: StateStore | None = None, io_threads: int = 4) -> None:
        """`reader` is a second connection to the same database (the writer's own when None, e.g. in tests)."""
        self.store = store
        self.reader = reader if reader is not None else store
        self._write = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="blob-io")
        self._read = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-read") if reader is not None else self._write
        )

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the writer's thread (store writes, and reads that must see them in order)."""
        return await asyncio.get_running_loop().run_in_executor(self._write, lambda: fn(*args, **kwargs))

    async def io(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the blob pool: calls that are safe to run side by side (content-addressed blob writes)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, lambda: fn(*args, **kwargs))

    async def read(self, fn: Callable[Concatenate[StateStore, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(reader, ...)` on the readers' thread: for API reads, which may lag the writer by a commit.
        Pass a function or a lambda (`lambda s: s.sites()`), never `StateStore.sites`: the abstract method."""
        return await asyncio.get_running_loop().run_in_executor(self._read, lambda: fn(self.reader, *args, **kwargs))

    def shutdown(self) -> None:
        """Finish what is queued, then close both connections."""
        self._io.shutdown(wait=True)
        self._write.shutdown(wait=True)
        self._read.shutdown(wait=True)
        if self.reader is not self.store:
            self.reader.close()
        self.store.close()
