"""The front door: ``vramplan.estimate(model, **options)`` for every model the catalogs know.

One resolver (:func:`resolve`) over the language-model catalog, the image-model catalog and local
config.json files; one :func:`estimate` that takes workload options (image models also ``resolution``
and ``pipeline``) and multi-GPU layout options (``gpus=8, fsdp="full"``: the result's ``per_gpu``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .catalog import CatalogEntry, resolve_model
from .errors import WorkloadError
from .estimator import estimate as _estimate
from .result import Estimate
from .spec import ModelSpec
from .workload import Workload

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
_LANGUAGE_ONLY = ("seq_len", "new_tokens", "logits", "lora_alpha", "lora_dropout", "trainable_layers")


def make_workload(**options: Any) -> Workload:
    """Build a :class:`Workload` from plain values (strings for enums, as the CLI and JSON API pass them)."""
    fields = Workload.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in fields:
            raise WorkloadError(f"unknown workload option {key!r}; known: {', '.join(sorted(fields))}")
        ftype = _ENUMS.get(key)
        if ftype is not None and not isinstance(value, ftype):
            try:
                value = ftype(str(value).lower())
            except ValueError:
                choices = ", ".join(m.value for m in ftype)
                raise WorkloadError(f"{key.replace('_', '-')} {value!r} is not one of: {choices}") from None
        if key == "lora_targets" and isinstance(value, str):
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        elif key == "lora_targets":
            value = tuple(value)
        kwargs[key] = value
    return Workload(**kwargs)


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


def resolve(model: str | ModelSpec | ModelRef, config: Mapping[str, Any] | None = None,
            local_files: bool = True) -> ModelRef:
    """One resolver: a :class:`ModelSpec`, an image-model name or diffusers config.json path, a language-model
    catalog name / alias / Hugging Face id or config.json path; or (``config``) an uploaded config object named
    ``model``. ``local_files=False``: the catalogs only, never a file."""
    if isinstance(model, ModelRef):
        return model
    if isinstance(model, ModelSpec):
        return ModelRef(model.name, spec=model)
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


def estimate(model: str | ModelSpec | ModelRef, workload: Workload | None = None, **options: Any) -> Estimate:
    """Estimate a workload for any model: a catalog name (language or image), a config.json path, a
    :class:`ModelSpec`.

    Options are the workload's fields (``task="infer"``, ``method="lora"``, ``batch_size=4``, …; image models
    also ``resolution`` and ``pipeline``) and the multi-GPU layout (``gpus=8, fsdp="full"``, ``zero=3``,
    ``tp=8``, …): with a layout, the result's ``per_gpu`` is the most loaded GPU.
    """
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
