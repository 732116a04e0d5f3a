"""A bounded pool of worker processes for the API's heavy requests (plans, sweeps), cancellable.

A plan of an image model takes seconds of pure-Python work; run in the server's own process it would hold
the interpreter lock and delay every estimate behind it. Here it runs in one of ``size`` worker processes
(spawned on first need, reused after); a request waits for a free one without blocking the event loop, and
when its client goes away the request leaves the queue, or its worker is killed (and replaced on next need).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from ..errors import VramplanError
from .options import RequestError

__all__ = ["ClientGone", "Workers"]


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work was abandoned."""


def _serve(conn: Connection) -> None:
    """A worker's loop: ``(function, argument)`` in, ``("ok", value)`` or ``(error kind, status, text)`` out."""
    while True:
        try:
            fn, arg = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(arg), ""))
        except RequestError as err:
            conn.send(("request", err.status, err.message))
        except VramplanError as err:
            conn.send(("vramplan", 422, str(err)))
        except Exception as err:  # a bug: the parent answers 500 and logs this line
            conn.send(("internal", 500, f"{type(err).__name__}: {err}"))


class _Worker:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True, name="vramplan-web-worker")
        self.process.start()
        child.close()

    async def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        self.conn.send((fn, arg))
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.conn.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            kind, value, text = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"a worker process ended (exit status {self.process.exitcode})") from None
        if kind == "ok":
            return value
        if kind == "request":
            raise RequestError(value, text)
        if kind == "vramplan":
            raise VramplanError(text)
        raise RuntimeError(text)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(1)
        self.conn.close()


class Workers:
    """At most ``size`` heavy requests run at once, each in a worker process; the rest wait their turn."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[[Any], Any], arg: Any, gone: Callable[[], Awaitable[Any]]) -> Any:
        """``fn(arg)`` in a worker; :class:`ClientGone` (and the work stopped) as soon as ``gone()`` returns."""
        work = asyncio.ensure_future(self._run(fn, arg))
        watch = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                if not task.done():
                    task.cancel()
        if work.done() and not work.cancelled():
            return work.result()
        raise ClientGone

    async def _run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            worker = self._idle.pop() if self._idle else _Worker()
            try:
                result = await worker.call(fn, arg)
            except (RequestError, VramplanError):
                self._idle.append(worker)
                raise
            except BaseException:  # cancelled (the client went away), or the worker died: never reuse it
                worker.kill()
                raise
            self._idle.append(worker)
            return result

    def close(self) -> None:
        while self._idle:
            self._idle.pop().kill()
