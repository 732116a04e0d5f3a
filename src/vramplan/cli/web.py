"""``vramplan serve`` (the local web page) and ``vramplan sweep`` (memory against sequence length or batch).

Registered by :mod:`vramplan.cli`; heavy imports (starlette, uvicorn, vl-convert) stay inside the handlers.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import sys
from typing import Any

from .._argtypes import integer
from ..errors import VramplanError
from ._flags import add_image_flags, add_workload_flags, options

__all__ = ["register"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535; 0 picks a free one)")
    return value


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range A:B of two integers (e.g. 512:32768)") from None


def register(sub: Any) -> None:
    s = sub.add_parser("serve", help="a local web page: pick a model and workload, see memory, charts and fits")
    s.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    s.set_defaults(handler=_serve)

    w = sub.add_parser("sweep", help="memory against sequence length or batch size, with GPU capacity lines")
    w.add_argument("model", metavar="MODEL", help="catalog name (vramplan models), HF id, or path to a config.json")
    w.add_argument("--over", choices=["seq-len", "batch-size"], required=True, help="the workload field to sweep")
    w.add_argument("--range", dest="value_range", type=_range, required=True, metavar="A:B",
                   help="from A to B, both included (doubling from A unless --steps is given)")
    w.add_argument("--steps", type=integer, default=None, help="N values evenly spaced on a log scale")
    add_workload_flags(w)
    add_image_flags(w)
    w.add_argument("--gpu", action="append", default=[], metavar="NAME",
                   help="draw this GPU's usable memory and say where it runs out (repeatable)")
    w.add_argument("--plot", metavar="FILE", help="write the chart: .png or .svg (needs vramplan[web])")
    w.add_argument("--json", action="store_true", help="print one JSON object")
    w.set_defaults(handler=_sweep)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(ns: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..web.app import create_app
    except ImportError as exc:
        raise VramplanError(f"vramplan serve needs the web extra ({exc.name} is missing): "
                            "pip install 'vramplan[web]'") from None
    loopback = _is_loopback(ns.host)
    if not loopback:
        sys.stderr.write(f"vramplan: warning: listening on {ns.host}: other machines on your network can reach "
                         "this page\n")
    # On loopback, answer only requests addressed to this machine by name (a guard against DNS rebinding).
    app = create_app(trusted_hosts=("127.0.0.1", "localhost", "::1", ns.host) if loopback else None)
    sock = _bind(ns.host, ns.port)  # before saying "serving on": a busy port is an error, not a banner
    port = sock.getsockname()[1]
    shown = f"[{ns.host}]" if ":" in ns.host else ns.host
    sys.stderr.write(f"vramplan: serving on http://{shown}:{port}/ (Ctrl+C stops)\n")
    server = uvicorn.Server(uvicorn.Config(app, host=ns.host, port=port, log_level="warning",
                                           server_header=False))
    server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> Any:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise VramplanError(f"port {port} on {host} is in use (another vramplan serve?); "
                                f"pick another with --port, or --port 0 for any free one") from None
        reason = exc.strerror or str(exc)
        raise VramplanError(f"cannot listen on {host}:{port}: {reason}; check --host and --port") from None


def _sweep(ns: argparse.Namespace) -> int:
    from ..charts import plot_sweep
    from ..render import note_gpu_choice
    from ..service import SweepQuery, sweep

    result = sweep(SweepQuery.of(ns.model, options(ns)))
    note_gpu_choice(*(ns.gpu or ()))
    if ns.plot:
        written = plot_sweep(result, ns.plot)
        sys.stderr.write(f"vramplan: wrote the sweep chart to {written}\n")
    if ns.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not ns.plot or result.stopped:
        _print_sweep(result.to_dict())
    return 0


def _print_sweep(data: dict[str, Any]) -> None:
    from rich.table import Table

    from ..render import console as _console
    from ..units import GiB

    console = _console()
    table = Table(title=f"{data['model']}: memory by {data['over']}", show_edge=False)
    table.add_column(data["over"], justify="right")
    table.add_column("peak allocated GiB", justify="right")
    table.add_column("nvidia-smi GiB", justify="right")
    table.add_column("peak phase")
    for p in data["points"]:
        table.add_row(f"{p['value']:,}", f"{p['peak_allocated_bytes'] / GiB:,.2f}", f"{p['total_bytes'] / GiB:,.2f}",
                      p["peak_phase"])
    console.print(table)
    for g in data["gpus"]:
        usable = g["usable_memory_bytes"] / GiB
        if g["oom_from"] is None:
            console.print(f"{g['display_name']} ({usable:,.1f} GiB): fits every value")
        elif g["fits_up_to"] is None:
            console.print(f"{g['display_name']} ({usable:,.1f} GiB): out of memory at every value")
        else:
            console.print(f"{g['display_name']} ({usable:,.1f} GiB): fits up to {g['fits_up_to']:,}, "
                          f"out of memory from {g['oom_from']:,}")
    if data["stopped"]:
        console.print(f"[yellow]note:[/yellow] {data['stopped']}")
