"""Load test of the local web API on loopback: N estimate requests from C concurrent clients; and the
responsiveness of estimates while heavy requests (plans of an image model) run or are dropped.

    python benchmarks/web_load.py [--requests 2000] [--clients 20] [--plans 3 --dropped 3]

Starts ``vramplan serve`` on a free loopback port (a subprocess, as a user runs it), sends POST
/api/estimate bodies drawn from the catalog (several models, tasks and batch sizes), checks every
answer against the estimator run in this process, and reports throughput and latency percentiles.
Bounded: a fixed number of requests, each with a timeout, only to 127.0.0.1. The client is a few
lines of asyncio over keep-alive HTTP/1.1 connections, so its own cost stays small next to the server's.

``--plans P --dropped D``: P ``plan sdxl`` requests (distinct, so none is answered from the cache) run
while D more are sent and dropped by their clients after 0.2 s; meanwhile one client sends distinct
estimates back to back, and the report gives their latency (the server's target: p95 under 100 ms) and
how long the plans took.

``tests/test_web_api.py`` runs the same load (and ``tests/test_web_e2e.py`` uses :func:`serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(timeout_s: float = 30.0, prefix: Sequence[str] = ()) -> Iterator[str]:
    """Run ``python -m vramplan serve`` on a free loopback port (after ``prefix``, e.g. ``prlimit --as=N``);
    yields its base URL, stops it after."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "vramplan", "serve", "--host", HOST, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"vramplan serve exited with {proc.returncode}: {out[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vramplan serve did not answer within {timeout_s:.0f} s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def cases(limit_models: int = 12) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request body, expected response) pairs: catalog models that take these workloads."""
    from vramplan.catalog import list_models
    from vramplan.errors import VramplanError
    from vramplan.web import handlers

    out = []
    models = [m.name for m in list_models() if m.params < 20e9][:limit_models]
    for model in models:
        for extra in ({}, {"batch_size": 2}, {"task": "infer", "batch_size": 4}, {"method": "lora", "seq_len": 1024}):
            body = {"model": model, **extra}
            try:
                out.append((body, handlers.run(handlers.job("estimate", body))))
            except VramplanError:
                continue  # e.g. a model with a short position table
    return out


@dataclass(frozen=True)
class LoadReport:
    requests: int
    clients: int
    wall_s: float
    latencies_s: tuple[float, ...]
    failures: tuple[str, ...]  # non-200 answers, wrong answers, connection errors

    @property
    def ok(self) -> int:
        return self.requests - len(self.failures)

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        if not xs:
            return math.nan
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    def summary(self) -> str:
        return (f"{self.requests} requests from {self.clients} clients in {self.wall_s:.2f} s "
                f"({self.requests / self.wall_s:,.0f} req/s): {self.ok} correct, {len(self.failures)} failed; "
                f"latency p50 {self.percentile(50) * 1e3:.1f} ms, p95 {self.percentile(95) * 1e3:.1f} ms, "
                f"p99 {self.percentile(99) * 1e3:.1f} ms, max {max(self.latencies_s, default=0) * 1e3:.1f} ms")


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str,
                   body: bytes) -> tuple[int, bytes]:
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _client(base: str, work: asyncio.Queue[tuple[bytes, dict[str, Any]]], latencies: list[float],
                  failures: list[str], timeout_s: float) -> None:
    host_port = base.removeprefix("http://")
    host, _, port = host_port.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        while True:
            try:
                body, expected = work.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                status, raw = await asyncio.wait_for(_request(reader, writer, host_port, "/api/estimate", body),
                                                     timeout_s)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
                failures.append(f"{type(err).__name__}: {err}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
                continue
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                failures.append(f"HTTP {status}: {raw[:200]!r}")
            elif json.loads(raw) != expected:
                failures.append(f"wrong answer for {body.decode()}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _run(base: str, work_items: Sequence[tuple[dict[str, Any], dict[str, Any]]], requests: int, clients: int,
               timeout_s: float) -> LoadReport:
    queue: asyncio.Queue[tuple[bytes, dict[str, Any]]] = asyncio.Queue()
    for i in range(requests):
        body, expected = work_items[i % len(work_items)]
        queue.put_nowait((json.dumps(body).encode(), expected))
    latencies: list[float] = []
    failures: list[str] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(base, queue, latencies, failures, timeout_s) for _ in range(clients)))
    return LoadReport(requests, clients, time.perf_counter() - t0, tuple(latencies), tuple(failures))


def run_load(base: str, work_items: Sequence[tuple[dict[str, Any], dict[str, Any]]], requests: int = 2000,
             clients: int = 20, timeout_s: float = 10.0) -> LoadReport:
    """Send ``requests`` estimate requests from ``clients`` concurrent keep-alive connections."""
    return asyncio.run(_run(base, work_items, requests, clients, timeout_s))


_PLAN_BODIES = [{"model": "sdxl", "sort": sort, "gpu_class": cls}
                for cls in ("any", "datacenter", "consumer", "workstation") for sort in ("cost", "time")]


async def _dropped(base: str, body: dict[str, Any], after_s: float) -> None:
    host_port = base.removeprefix("http://")
    host, _, port = host_port.partition(":")
    _, writer = await asyncio.open_connection(host, int(port))
    raw = json.dumps(body).encode()
    writer.write(f"POST /api/plan HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    await writer.drain()
    await asyncio.sleep(after_s)
    writer.close()  # the client goes away: the server abandons the plan


async def _timed(base: str, path: str, body: dict[str, Any], timeout_s: float) -> tuple[int, float]:
    host_port = base.removeprefix("http://")
    host, _, port = host_port.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.perf_counter()
    try:
        status, _ = await asyncio.wait_for(_request(reader, writer, host_port, path, json.dumps(body).encode()),
                                           timeout_s)
    finally:
        writer.close()
    return status, time.perf_counter() - t0


@dataclass(frozen=True)
class BusyReport:
    plans: int
    dropped: int
    estimate_latencies_s: tuple[float, ...]
    plan_s: tuple[float, ...]
    plans_running_at_end: int  # plans still unanswered when the last estimate came back
    failures: tuple[str, ...]

    def percentile(self, q: float) -> float:
        return LoadReport(0, 0, 0, self.estimate_latencies_s, ()).percentile(q)

    def summary(self) -> str:
        return (f"{len(self.estimate_latencies_s)} estimates while {self.plans} plan sdxl ran and {self.dropped} were "
                f"dropped: p50 {self.percentile(50) * 1e3:.1f} ms, p95 {self.percentile(95) * 1e3:.1f} ms, "
                f"max {max(self.estimate_latencies_s, default=0) * 1e3:.1f} ms; plans took "
                f"{', '.join(f'{t:.1f}' for t in self.plan_s)} s; {len(self.failures)} failures")


async def _busy(base: str, work_items: Sequence[tuple[dict[str, Any], dict[str, Any]]], plans: int, dropped: int,
                estimates: int, timeout_s: float) -> BusyReport:
    failures: list[str] = []
    heavy = [asyncio.ensure_future(_timed(base, "/api/plan", body, timeout_s)) for body in _PLAN_BODIES[:plans]]
    gone = [asyncio.ensure_future(_dropped(base, body, 0.2)) for body in _PLAN_BODIES[plans:plans + dropped]]
    await asyncio.sleep(0.5)  # the plans have started (or wait for a worker)
    latencies: list[float] = []
    for body, _ in work_items[:estimates]:
        status, dt = await _timed(base, "/api/estimate", body, timeout_s)
        latencies.append(dt)
        if status != 200:
            failures.append(f"estimate HTTP {status}")
    running = sum(not t.done() for t in heavy)
    await asyncio.gather(*gone)
    plan_s = []
    for status, dt in await asyncio.gather(*heavy):
        plan_s.append(dt)
        if status != 200:
            failures.append(f"plan HTTP {status}")
    return BusyReport(plans, dropped, tuple(latencies), tuple(plan_s), running, tuple(failures))


def run_busy(base: str, work_items: Sequence[tuple[dict[str, Any], dict[str, Any]]], plans: int = 3,
             dropped: int = 3, estimates: int = 40, timeout_s: float = 300.0) -> BusyReport:
    """Distinct estimates, one after another, while ``plans`` image-model plans run and ``dropped`` are dropped."""
    return asyncio.run(_busy(base, work_items, plans, dropped, estimates, timeout_s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--plans", type=int, default=0, help="also: estimates while this many plan sdxl requests run")
    p.add_argument("--dropped", type=int, default=3, help="with --plans: plan requests their clients drop")
    ns = p.parse_args()
    work = cases()
    with serve() as base:
        report = run_load(base, work, ns.requests, ns.clients)
        busy = run_busy(base, work, ns.plans, ns.dropped) if ns.plans else None
    print(f"{len(work)} distinct requests; {report.summary()}")
    for failure in report.failures[:10]:
        print("  ", failure)
    if busy is not None:
        print(busy.summary())
    raise SystemExit(1 if report.failures or (busy is not None and busy.failures) else 0)


if __name__ == "__main__":
    main()
