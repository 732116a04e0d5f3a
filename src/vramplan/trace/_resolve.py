"""Which transformers classes a config.json builds, resolved the way transformers resolves them.

* The config class: ``AutoConfig.from_pretrained`` on the config as written (transformers' own reader: its
  special floats ``{"__float__": "Infinity"}``, its ``model_type`` heuristics and sub-configs such as
  ``text_config`` / ``vision_config``), with ``trust_remote_code`` off. A config that declares remote code
  (``auto_map``) for a ``model_type`` the installed transformers does not ship is refused with one line; one
  whose ``model_type`` transformers ships uses the built-in classes, as transformers does
  (transformers/models/auto/configuration_auto.py, ``AutoConfig.from_pretrained``).
* The model class: the auto mapping of the causal-LM task for that config class, with the config's
  ``architectures`` choosing among several (transformers/models/auto/auto_factory.py, ``_get_model_class``);
  configs the causal-LM mapping does not hold (vision-language models such as LLaVA) fall back to the
  image-text-to-text mapping, which is what transformers generates text with for them.

No list of model types is kept here: what the installed transformers can build is what the trace can build.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from ..errors import VramplanError

__all__ = ["build_config", "hf_config", "model_class", "remote_code_refusal"]

# Keys dropped before transformers reads the config: the workload says the dtype and the quantization, and
# auto_map is checked (and refused or ignored) before the read.
_DROP_KEYS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map", "quantization_config")


def remote_code_refusal(raw: Mapping[str, Any], name: str) -> str | None:
    """The one-line refusal for a config whose classes only exist as remote code, or None."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    auto_map = raw.get("auto_map")
    model_type = raw.get("model_type")
    if not isinstance(auto_map, Mapping) or not auto_map:
        return None
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return None  # transformers uses its built-in classes when trust_remote_code is off
    if _architecture_class(raw) is not None:
        return None
    refs = ", ".join(f"{k} -> {v}" for k, v in sorted(auto_map.items()) if isinstance(v, str))[:160]
    return (f"{name}: this config needs code from the model's repository (auto_map: {refs}); vramplan never runs "
            f"code from a config (trust_remote_code stays off) and transformers {transformers.__version__} has no "
            f"built-in model_type {model_type!r}: use a config with a model_type transformers ships, or a newer "
            "transformers that includes this architecture")


def _architecture_class(raw: Mapping[str, Any]) -> type | None:
    """The first class of ``architectures`` that transformers ships (its config class names the model_type)."""
    import transformers

    archs = raw.get("architectures")
    if not isinstance(archs, list):
        return None
    for arch in archs:
        if not isinstance(arch, str) or not arch.isidentifier():
            continue
        try:
            cls = getattr(transformers, arch)
        except (AttributeError, ImportError, RuntimeError):
            continue
        if isinstance(cls, type) and isinstance(getattr(cls, "config_class", None), type):
            return cls
    return None


def hf_config(raw: Mapping[str, Any], name: str) -> tuple[Any, list[str]]:
    """The transformers config object for ``raw`` (read by transformers itself), and warnings to show."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    refusal = remote_code_refusal(raw, name)
    if refusal is not None:
        raise VramplanError(refusal)
    warnings: list[str] = []
    cfg = {k: v for k, v in raw.items() if k not in _DROP_KEYS}
    model_type = cfg.get("model_type")
    if "auto_map" in raw:
        warnings.append(f"the config names remote code (auto_map); traced transformers' built-in "
                        f"{model_type!r} classes instead, as transformers does with trust_remote_code off")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        arch = _architecture_class(raw)
        if arch is None:
            what = (f"model_type {model_type!r} is not known to" if isinstance(model_type, str)
                    else "the config has no model_type, and no class of its architectures is in")
            raise VramplanError(f"{name}: {what} transformers {transformers.__version__}; upgrade transformers "
                                "(pip install -U transformers) or use the analytic estimate")
        new_type = getattr(arch.config_class, "model_type", "")
        if not new_type:
            raise VramplanError(f"{name}: {arch.__name__} has no model_type in transformers "
                                f"{transformers.__version__}")
        warnings.append(f"model_type {model_type!r} is not in transformers {transformers.__version__}; read as "
                        f"{new_type!r}, the config class of its architecture {arch.__name__}")
        cfg["model_type"] = new_type
    with tempfile.TemporaryDirectory(prefix="vramplan-config-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(cfg, fh)  # floats such as inf are written as JSON's Infinity, which transformers reads back
        try:
            config = transformers.AutoConfig.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
        except (KeyError, ValueError, TypeError, AttributeError, OSError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise VramplanError(f"{name}: transformers {transformers.__version__} cannot read this config "
                                f"({type(exc).__name__}: {msg})") from None
    return config, warnings


def model_class(config: Any, name: str) -> type:
    """The class transformers generates text with for ``config``: the causal-LM mapping, else the
    image-text-to-text mapping, each choosing among several classes by the config's ``architectures``."""
    import transformers
    from transformers.models.auto import modeling_auto

    mappings = [modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING]
    for extra in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING", "MODEL_FOR_VISION_2_SEQ_MAPPING"):
        mapping = getattr(modeling_auto, extra, None)
        if mapping is not None:
            mappings.append(mapping)
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    candidates: list[type] = []
    for mapping in mappings:
        try:
            supported = mapping[type(config)]
        except (KeyError, ValueError, ImportError, AttributeError):
            continue
        classes = list(supported) if isinstance(supported, (list, tuple)) else [supported]
        for cls in classes:
            if cls.__name__ in archs:
                return cls
        candidates.extend(classes)
    if candidates:
        return candidates[0]
    raise VramplanError(f"{name}: transformers {transformers.__version__} has no text-generation model for "
                        f"{type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}, "
                        f"architectures {archs or 'not given'}); the trace builds causal-LM and image-text-to-text "
                        "models only")


def build_config(config: Any, cls: type) -> Any:
    """The config ``cls`` is built on: a composite config's text sub-config when the class is its language model
    alone (``config_class`` is the text sub-config's class, as for ``Qwen3_5ForCausalLM``, ``Llama4ForCausalLM``,
    ``Emu3ForCausalLM``, ``MllamaForCausalLM``), else the config itself. This is what transformers'
    ``AutoModelForCausalLM.from_config`` / ``from_pretrained`` do (transformers/models/auto/auto_factory.py,
    ``_BaseAutoModelClass``: the ``get_text_config()`` swap)."""
    subs = getattr(config, "sub_configs", None) or {}
    text_cls = subs.get("text_config") if isinstance(subs, Mapping) else None
    if text_cls is not None and getattr(cls, "config_class", None) is text_cls:
        return config.get_text_config()
    return config
