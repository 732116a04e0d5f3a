"""Vision and diffusion models: torchvision backbones, diffusers UNets, diffusion transformers and whole
pipelines (text encoders + denoiser + VAE), StyleGAN2-ADA.

``estimate_vision("sdxl", task="infer", batch_size=2, precision="fp16")`` returns the same
:class:`~vramplan.result.Estimate` as the language-model estimator; ``vramplan.estimate`` reaches it through
:func:`find_vision_model`. Pure Python: no torch at import or run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from ..errors import WorkloadError
from ..result import Estimate
from ..workload import Optimizer, Precision, Task
from ._catalog import VisionEntry, config_file_entry, get_vision_model, list_vision_models, lookup

if TYPE_CHECKING:
    from ._workload import VisionMethod, VisionWorkload

__all__ = [
    "VisionEntry", "VisionMethod", "VisionWorkload", "estimate_vision", "find_vision_model", "get_vision_model",
    "is_vision_model", "list_vision_models", "make_vision_workload", "resolution_grid",
]



def __getattr__(name: str) -> Any:
    """``VisionMethod`` and ``VisionWorkload`` (:mod:`._workload`), imported when first used: resolving a language
    model's name asks this package's catalog (:func:`find_vision_model`) and needs neither."""
    if name in ("VisionMethod", "VisionWorkload"):
        from . import _workload

        return getattr(_workload, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _enums() -> Mapping[str, Any]:
    from ._workload import VisionMethod

    return {"task": Task, "method": VisionMethod, "precision": Precision, "optimizer": Optimizer}


def find_vision_model(name: str) -> VisionEntry | None:
    """The entry of a vision/diffusion catalog name or alias, or of a diffusers model config.json; else None."""
    return lookup(name) or config_file_entry(name)


def is_vision_model(name: str) -> bool:
    """Whether ``name`` is a vision/diffusion catalog name or alias, or a diffusers model config.json."""
    return find_vision_model(name) is not None


def make_vision_workload(**options: Any) -> VisionWorkload:
    """A :class:`VisionWorkload` from plain values (strings for enums). ``attention="eager"`` selects the
    eager attention path; ``None`` values are ignored."""
    from ._workload import VisionWorkload

    fields = VisionWorkload.__dataclass_fields__
    kw: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "attention":
            kw["eager_attention"] = str(value).lower() == "eager"
            continue
        if key not in fields:
            raise WorkloadError(f"unknown option {key!r} for an image model; known: {', '.join(sorted(fields))}")
        enum = _enums().get(key)
        if enum is not None and not isinstance(value, enum):
            try:
                value = enum(str(value).lower())
            except ValueError:
                choices = ", ".join(m.value for m in enum)
                raise WorkloadError(f"{key.replace('_', '-')} {value!r} is not one of: {choices}") from None
        if key == "lora_targets":
            if isinstance(value, str):
                value = tuple(t.strip() for t in value.split(",") if t.strip())
            value = tuple(value)
        kw[key] = value
    return VisionWorkload(**kw)


def _entry(name: str | VisionEntry) -> VisionEntry:
    if isinstance(name, VisionEntry):
        return name
    e = lookup(name)
    if e is not None:
        return e
    f = config_file_entry(name)
    if f is not None:
        return f
    return get_vision_model(name)


def resolution_grid(name: str) -> tuple[int, int] | None:
    """The resolutions ``name`` takes, as ``(step, smallest)``: every multiple of ``step`` from ``smallest``
    up (within the workload's limit, and the model's position table where it has one); ``None`` when the
    architecture generates one fixed size (StyleGAN). Found with the estimator's own resolution check."""
    return _grid(_entry(name).name if lookup(name) is not None else name)


@cache
def _grid(name: str) -> tuple[int, int] | None:
    from ._estimate import _check_resolution
    from ._workload import _MAX_RES

    entry = _entry(name)

    def ok(res: int) -> bool:
        try:
            _check_resolution(entry, res)
        except WorkloadError:
            return False
        return True

    first = next((r for r in range(8, _MAX_RES + 1) if ok(r)), None)
    if first is None:
        raise WorkloadError(f"{entry.name} takes no resolution from 8 to {_MAX_RES} pixels")
    nxt = next((r for r in range(first + 1, min(_MAX_RES, 8 * first) + 1) if ok(r)), None)
    return None if nxt is None else (nxt - first, first)


def estimate_vision(name: str | VisionEntry, workload: VisionWorkload | None = None, **options: Any) -> Estimate:
    """Estimate peak GPU memory of an image model (catalog name, alias, or diffusers config.json path).

    Options are :class:`VisionWorkload` fields: ``task``, ``method`` (full|lora), ``precision``,
    ``optimizer``, ``batch_size``, ``resolution`` (pixels per side), ``gradient_checkpointing``,
    ``attention`` (sdpa|eager), ``lora_rank``, ``lora_targets``, ``pipeline``, ``guidance``,
    ``cached_latents``, ``train_text_encoder``.

    Known limits: one GPU; cuDNN convolution workspaces are not modelled (the calibration peaks put them
    within 2.5%); allocator block rounding only for parameter-sized tensors; attention kernels as an sm80+
    GPU with torch 2.5-2.11 picks them; StyleGAN's create_graph regularization passes are estimated from the
    gradients and products their backward computes; DreamBooth text encoders at max_length padding; no
    safety checker, CPU offload, VAE tiling/slicing or torch.compile.
    """
    from ._estimate import estimate_entry
    from ._workload import VisionWorkload

    if workload is None:
        workload = make_vision_workload(**options)
    elif options:
        base = {f: getattr(workload, f) for f in VisionWorkload.__dataclass_fields__}
        workload = make_vision_workload(**{**base, **options})
    entry = _entry(name)
    if lookup(entry.name) is entry:  # a catalog entry (data shipped with the package): the answer is memoized
        return _estimate_catalog(entry.name, workload)
    return estimate_entry(entry, workload)  # a config.json read now: the file may change between calls


@lru_cache(maxsize=1024)
def _estimate_catalog(name: str, workload: VisionWorkload) -> Estimate:
    """:func:`estimate_entry` of a catalog entry, a pure function of its name and the frozen workload (the
    result is frozen too), as the language-model path memoizes ``estimator._estimate_cached``."""
    from ._estimate import estimate_entry

    entry = lookup(name)
    assert entry is not None
    return estimate_entry(entry, workload)
