"""The front door: ``vramplan.estimate(model, **options)`` for every model the catalogs know.

One resolver (:func:`resolve`) over the language-model catalog, the image-model catalog and local
config.json files; one :func:`estimate` that takes workload options (image models also ``resolution``
and ``pipeline``) and multi-GPU layout options (``gpus=8, fsdp="full"``: the result's ``per_gpu``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ._values import as_bool, as_float, as_int, as_name
from .catalog import CatalogEntry, resolve_model
from .errors import VramplanError, WorkloadError
from .estimator import estimate as _estimate
from .result import Estimate
from .spec import ModelSpec
from .workload import Task, Workload

if TYPE_CHECKING:
    from .parallel import Layout, Links
    from .vision import VisionEntry

__all__ = ["IMAGE_OPTIONS", "LAYOUT_OPTIONS", "ModelRef", "estimate", "image_options", "layout_of", "make_workload",
           "resolve"]

# Multi-GPU layout options (the CLI's flags, the web API's keys); all None (or off) for one GPU.
LAYOUT_OPTIONS = ("gpus", "nodes", "zero", "fsdp", "tp", "pp", "ep", "micro_batches", "offload", "sequence_parallel",
                  "virtual_stages", "intra_node_link", "inter_node_link")
IMAGE_OPTIONS = ("resolution", "pipeline")  # workload options only image models take
# Language-model options an image model has no use for: refused unless left at the Workload default.
_LANGUAGE_ONLY = ("seq_len", "new_tokens", "logits", "lora_alpha", "lora_dropout", "trainable_layers", "images",
                  "image_size", "freeze_vision", "text_only", "ssm_kernel", "hub_kernels", "load")


def make_workload(**options: Any) -> Workload:
    """Build a :class:`Workload` from plain values (strings for enums, as the CLI and JSON API pass them).

    Every value is checked against its field's type here, at the boundary: ``"false"`` is not a true
    switch, ``"8"`` is the integer 8, and a value of the wrong type is a :class:`WorkloadError` naming the field.
    """
    fields = Workload.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in fields:
            raise WorkloadError(f"unknown workload option {key!r}; known: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(key, value)
    return Workload(**kwargs)


_INT_FIELDS = frozenset({"batch_size", "seq_len", "new_tokens", "lora_rank", "lora_alpha", "gradient_accumulation",
                         "trainable_layers", "quant_group_size", "images", "image_size"})


def _coerce(key: str, value: Any) -> Any:
    """One workload option, from what a person or a JSON body gives, to the field's type."""
    try:
        ftype = _ENUMS.get(key)
        if ftype is not None:
            if isinstance(value, ftype):
                return value
            if key == "task" and isinstance(value, str) and value.strip().lower() == "finetune":
                return Task.TRAIN  # plan's vocabulary: fine-tuning is a training step; --method says what trains
            if isinstance(value, str) and value.strip().lower() in {m.value for m in ftype}:
                return ftype(value.strip().lower())
            choices = ", ".join(m.value for m in ftype)
            shown = repr(value) if len(repr(value)) <= 60 else type(value).__name__
            raise WorkloadError(f"{key.replace('_', '-')} {shown} is not one of: {choices}")
        if key in _INT_FIELDS:
            return as_int(key, value)
        if key in ("gradient_checkpointing", "double_quant", "freeze_vision", "text_only", "hub_kernels", "packing",
                   "activation_offload", "rslora"):
            return as_bool(key, value)
        if key == "lora_dropout":
            return as_float(key, value)
        if key == "lora_targets":
            return _targets(value)
        if key == "lora_modules_to_save":
            return tuple(t.strip() for t in value.split(",") if t.strip()) if isinstance(value, str) else tuple(value)
    except WorkloadError:
        raise
    except VramplanError as exc:
        raise WorkloadError(str(exc)) from None
    return value


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise WorkloadError(f"lora_targets must be module names (q_proj,v_proj), all-linear or default; "
                            f"got {type(value).__name__}")
    if len(items) > 256 or not all(isinstance(t, str) and len(t) <= 200 for t in items):
        raise WorkloadError("lora_targets must be at most 256 module names (strings), e.g. q_proj,v_proj")
    return tuple(t.strip() for t in items if t.strip())


_ENUMS = {name: type(f.default) for name, f in Workload.__dataclass_fields__.items() if isinstance(f.default, StrEnum)}


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as the catalogs (or a config.json) name it: a language model (``spec``) or an image model
    (``image``: a :class:`~vramplan.vision.VisionEntry`). ``kind`` is ``"llm"`` or ``"image"``."""

    name: str
    spec: ModelSpec | None = None
    entry: CatalogEntry | None = None
    image: VisionEntry | None = None

    @property
    def kind(self) -> str:
        return "image" if self.image is not None else "llm"

    def language_spec(self, what: str) -> ModelSpec:
        """The language-model spec, or a clear error saying ``what`` needs one."""
        if self.spec is None:
            raise WorkloadError(f"{what} is modelled for language models; {self.name} is an image model")
        return self.spec


def resolve(model: str | os.PathLike[str] | ModelSpec | ModelRef, config: Mapping[str, Any] | None = None,
            local_files: bool = True) -> ModelRef:
    """One resolver: a :class:`ModelSpec`, an image-model name or diffusers config.json path, a language-model
    catalog name / alias / Hugging Face id or config.json path; or (``config``) an uploaded config object named
    ``model``. ``local_files=False``: the catalogs only, never a file."""
    if isinstance(model, ModelRef):
        return model
    if isinstance(model, ModelSpec):
        return ModelRef(model.name, spec=model)
    model = as_name("model", model)  # a str or path of sane length: a VramplanError naming the field otherwise
    if config is not None:
        from .hfconfig import spec_from_config

        spec = spec_from_config(config, name=model)
        return ModelRef(spec.name, spec=spec)
    from .catalog import get_model
    from .vision import find_vision_model
    from .vision._catalog import lookup

    image = find_vision_model(model) if local_files else lookup(model)
    if image is not None:
        return ModelRef(image.name, image=image)
    if not local_files:
        entry = get_model(model)
        return ModelRef(entry.name, spec=entry.spec, entry=entry)
    spec, found = resolve_model(model)
    return ModelRef(found.name if found else spec.name, spec=spec, entry=found)


def layout_of(options: Mapping[str, Any]) -> tuple[Layout, Links] | None:
    """The :class:`~vramplan.parallel.Layout` and links the layout options describe; None for one GPU."""
    given = {k: options.get(k) for k in LAYOUT_OPTIONS}
    if not given["sequence_parallel"]:  # a plain switch: off is the same as not given
        given["sequence_parallel"] = None
    if all(given[k] is None for k in LAYOUT_OPTIONS[:-2]):
        return None
    from .parallel import FSDPMode, Layout, Links, Offload, get_link

    tp, pp = given["tp"] or 1, given["pp"] or 1
    layout = Layout(
        gpus=given["gpus"] or tp * pp, nodes=given["nodes"] or 1, tp=tp, pp=pp, ep=given["ep"] or 1,
        zero=given["zero"] or 0, fsdp=FSDPMode(given["fsdp"]) if given["fsdp"] else None,
        micro_batches=given["micro_batches"] or 1, offload=Offload(given["offload"] or "none"),
        sequence_parallel=bool(given["sequence_parallel"]), virtual_stages=given["virtual_stages"] or 1)
    links = Links(get_link(given["intra_node_link"] or Links().intra_node).name,
                  get_link(given["inter_node_link"] or Links().inter_node).name)
    return layout, links


def image_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Workload options (the language models' names, as the CLI and web API give them) as an image model's
    :func:`~vramplan.vision.estimate_vision` options; what an image model cannot do is an error. Defaults are
    the :class:`Workload`'s (a LoRA rank of 16, as for language models)."""
    defaults = Workload.__dataclass_fields__
    out: dict[str, Any] = {"lora_rank": defaults["lora_rank"].default}
    for key, value in options.items():
        if value is None or key in LAYOUT_OPTIONS:
            continue
        if key in _LANGUAGE_ONLY:
            if value != defaults[key].default:
                raise WorkloadError(f"--{key.replace('_', '-')} applies to language models, not image models")
            continue
        if key == "method" and str(value) not in ("full", "lora"):
            raise WorkloadError(f"--method {value} is not available for image models; use full or lora")
        if key == "weights_quant":
            if str(value) != "none":
                raise WorkloadError("--weights-quant is not modelled for image models")
            continue
        if key == "lora_targets" and value in ("default", ("default",)):
            continue
        out[key] = value
    return out


def estimate(model: str | os.PathLike[str] | ModelSpec | ModelRef, workload: Workload | None = None,
             **options: Any) -> Estimate:
    """Estimate a workload for any model: a catalog name (language or image), a config.json path, a
    :class:`ModelSpec`.

    Options are the workload's fields (``task="infer"``, ``method="lora"``, ``batch_size=4``, …; image models
    also ``resolution`` and ``pipeline``) and the multi-GPU layout (``gpus=8, fsdp="full"``, ``zero=3``,
    ``tp=8``, …): with a layout, the result's ``per_gpu`` is the most loaded GPU.
    """
    if workload is not None and not isinstance(workload, Workload):
        raise WorkloadError(f"workload must be a vramplan.Workload (or pass its fields as keywords), "
                            f"got {type(workload).__name__}")
    ref = resolve(model)
    layout = layout_of(options)
    options = {k: v for k, v in options.items() if k not in LAYOUT_OPTIONS}
    if workload is not None:
        options = {**{f: getattr(workload, f) for f in Workload.__dataclass_fields__}, **options}
    if ref.image is not None:
        if layout is not None:
            raise WorkloadError(f"multi-GPU layouts are modelled for language models; {ref.name} is an image model")
        from .vision import estimate_vision

        return estimate_vision(ref.image, **image_options(options))
    for key in IMAGE_OPTIONS:
        if options.pop(key, None):
            raise WorkloadError(f"--{key} applies to image models; {ref.name} is a language model")
    spec = ref.language_spec("this estimate")
    w = make_workload(**options)
    est = _estimate(spec, w, name=ref.name)
    if layout is None:
        return est
    from .parallel import estimate_parallel

    return dataclasses.replace(est, per_gpu=estimate_parallel(spec, w, *layout))
