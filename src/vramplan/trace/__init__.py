"""Trace the real model code on fake tensors and report the peak GPU memory the CUDA caching allocator
would report (``torch.cuda.max_memory_allocated``).

``trace_workload(config, workload)`` builds the transformers (and peft) model for a Hugging Face
``config.json`` without weights, runs the workload's training steps or prefill + decode on fake tensors
(no GPU, no weights), and accounts every allocation with CUDA's rounding, kernel choices and autocast
rules. It needs the ``[torch]`` extra; ``import vramplan.trace`` works without it.

What is emulated (the trace runs on fake *cpu* tensors; a CPU-only torch build cannot run backward on fake
CUDA tensors): CUDA's scaled-dot-product-attention kernel choice (cuDNN/flash, memory-efficient, math) and
the kernels' internal backward buffers, fused dropout, CUDA autocast policies and its weight-cast cache, the
foreach optimizer path, 512-byte allocator blocks, two (training) or one (inference) 32 MiB cuBLAS
workspace, bitsandbytes NF4 / LLM.int8 / 8-bit AdamW (their storage and temporaries; the arithmetic is not
reproduced) and fp8 weights.

Known limits: the trace follows the *installed* torch / transformers / peft code, so version differences
are real differences (e.g. transformers 5.24 drops SDPA for Gemma-2, 5.17 kept it; torch 2.13's
``_safe_softmax`` backward allocates less than 2.11's). Data-dependent ``.item()`` calls are answered as
real data would (random draws at their mean, masks all-true); MoE routing shapes come from the grouped
kernels, which do not depend on routing. One training step stands for the steady state (the optimizer
state is created first); decode steps 1 and N are traced and the KV cache is grown through its own
``update()`` in between. Multi-GPU layouts are not traced. Not thread-safe: a trace installs temporary
kernels on the CPU dispatch keys for its duration.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._files import read_text_limited
from ..errors import VramplanError
from ..hfconfig import MAX_CONFIG_BYTES
from ..result import Estimate
from ..workload import Workload

__all__ = ["ROUTINGS", "TORCH_MISSING", "decode_special_floats", "library_versions", "load_trace_config",
           "read_config_file",
           "trace_available", "trace_vision", "trace_workload"]

# How MoE tokens are routed in a trace: "balanced" (every expert gets batch x seq x top_k / experts tokens,
# what a trained router aims for) or "worst" (every token of the batch lands on the same top_k experts).
ROUTINGS = ("balanced", "worst")

TORCH_MISSING = "vramplan trace needs the [torch] extra: pip install 'vramplan[torch]' (torch, transformers, peft)"


def library_versions() -> dict[str, str]:
    """The torch / transformers / peft (and, for image models, torchvision / diffusers) versions a trace runs (and
    so models); "missing" where absent."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("torch", "transformers", "peft", "torchvision", "diffusers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def trace_available() -> bool:
    """Whether torch, transformers and peft can be imported."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


_progress: Callable[[str], None] | None = None


def report(step: str) -> None:
    """Tell the caller's ``progress`` callback which step the trace is in (import, build, forward, …)."""
    if _progress is not None:
        _progress(step)


# transformers >= 5 writes the floats JSON cannot hold as {"__float__": "Infinity"} (configuration_utils.py,
# PreTrainedConfig._encode_special_floats); its reader turns them back.
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_special_floats(obj: Any) -> Any:
    """``{"__float__": "Infinity"}`` (and -Infinity, NaN) back to floats, anywhere in a parsed config."""
    if isinstance(obj, dict):
        tag = obj.get("__float__")
        if len(obj) == 1 and isinstance(tag, str) and tag in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[tag]
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config.json (or a directory holding one) as transformers reads it, special floats included."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    try:
        text = read_text_limited(p, MAX_CONFIG_BYTES)
    except (OSError, ValueError) as exc:
        raise VramplanError(f"{path}: cannot read the config ({exc.strerror or exc}); give a config.json file, "
                            "a directory holding one, or a catalog name (vramplan models)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VramplanError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise VramplanError(f"{p}: JSON nested too deeply to be a config.json") from None
    if not isinstance(data, dict):
        raise VramplanError(f"{p}: not a JSON object; a config.json holds one object")
    return decode_special_floats(data)  # type: ignore[no-any-return]


def load_trace_config(model: str) -> tuple[dict[str, Any], str, str | None]:
    """What ``vramplan trace MODEL`` traces: the config mapping, a display name, and the catalog name (None for
    a file). A file is read as-is (transformers decides what it can build), never through the estimator's reader."""
    from ..catalog import get_model

    path = Path(model).expanduser()
    if model.lower().endswith(".json") or path.is_file() or path.is_dir():
        name = path.parent.name if path.is_file() or model.lower().endswith(".json") else path.name
        return read_config_file(path), name or "model", None
    entry = get_model(model)
    return decode_special_floats(dict(entry.config_dict())), entry.name, entry.name


def trace_workload(config: Mapping[str, Any], workload: Workload, *, name: str = "model",
                   routing: str = "balanced", progress: Callable[[str], None] | None = None) -> Estimate:
    """Peak GPU memory of ``workload`` on the model described by ``config`` (a config.json mapping).

    ``routing``: how MoE tokens reach experts where the model's dispatch depends on the data (``ROUTINGS``).
    Vision-language models are built whole (vision tower, projector, language model) and run on text tokens:
    their vision tower's weights count, its activations are not traced (a warning says so). ``progress``, when
    given, is called with each step as it starts: importing torch, building the model, then the phases
    (forward, backward, optimizer step; prefill, decode) — a trace takes seconds."""
    global _progress
    if routing not in ROUTINGS:
        raise VramplanError(f"routing {routing!r} is not one of: {', '.join(ROUTINGS)}")
    _progress = progress
    try:
        report("importing torch, transformers and peft")
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise VramplanError(TORCH_MISSING) from None
        from ._engine import run_trace

        return run_trace(decode_special_floats(dict(config)), workload, name, routing=routing)
    finally:
        _progress = None


def trace_vision(model: str | Any, workload: Any = None, *,
                 progress: Callable[[str], None] | None = None, **options: Any) -> Estimate:
    """Peak GPU memory of an image model (a vision catalog name or alias, a diffusers UNet config.json, or a
    :class:`~vramplan.vision.VisionEntry`) traced on fake tensors, as ``measure.py``'s ``run_vision`` (torchvision
    backbones) and ``run_unet`` (diffusers UNets) run it: the same :class:`Estimate` as
    :func:`vramplan.vision.estimate_vision`, which takes the same options (``task``, ``precision``, ``batch_size``,
    ``resolution``, ``gradient_checkpointing``, ``attention``, ``optimizer``). Needs the ``[torch,image-trace]``
    extras. Whole pipelines, diffusion transformers, StyleGAN and LoRA are refused with a one-line error."""
    global _progress
    from ..vision import VisionEntry, VisionWorkload, make_vision_workload
    from ..vision._catalog import config_file_entry, get_vision_model
    from ..vision._estimate import _check_resolution, _native_resolution

    entry = model if isinstance(model, VisionEntry) else config_file_entry(str(model)) or get_vision_model(str(model))
    if workload is None:
        workload = make_vision_workload(**options)
    elif options:
        base = {f: getattr(workload, f) for f in VisionWorkload.__dataclass_fields__}
        workload = make_vision_workload(**{**base, **options})
    if workload.pipeline and entry.kind == "unet" and entry.pipeline:  # the pipeline the denoiser belongs to
        entry = get_vision_model(entry.pipeline)
    from ._vision_refusal import vision_refusal

    why = vision_refusal(entry, workload)
    if why is not None:
        raise VramplanError(why)
    res = workload.resolution or _native_resolution(entry)
    _check_resolution(entry, res)
    _progress = progress
    try:
        report("importing torch")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise VramplanError(TORCH_MISSING) from None
        from ._vision import run_vision_trace

        return run_vision_trace(entry, workload, res)
    finally:
        _progress = None
