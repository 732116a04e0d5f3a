"""Quantized checkpoints: what each format stores for one linear layer, and which layers it quantizes.

A :class:`LinearQuant` lists the tensors one quantized ``nn.Linear`` of ``in_features`` K and
``out_features`` N holds in its checkpoint (name suffix, dtype, shape), following the layout the format's
own loader creates; bytes are the sum of those tensors, so they equal a checkpoint's header:

* ``gptq`` — AutoGPTQ / GPTQModel ``QuantLinear`` (and vLLM ``vllm/model_executor/layers/quantization/
  gptq.py: GPTQLinearMethod.create_weights``): ``qweight`` int32 [K*b/32, N], ``qzeros`` int32
  [G, N*b/32], ``scales`` fp16 [G, N], ``g_idx`` int32 [K] (always saved), G = ceil(K / group_size).
* ``awq`` — AutoAWQ GEMM (vLLM ``awq.py: AWQLinearMethod.create_weights``): ``qweight`` int32 [K, N*b/32],
  ``qzeros`` int32 [G, N*b/32], ``scales`` fp16 [G, N].
* ``compressed-tensors`` — ``compressed_tensors/compressors/quantized_compressors/pack_quantized.py``
  (vLLM ``compressed_tensors_wNa16.py``): ``weight_packed`` int32 [N, K*b/32], ``weight_scale`` [N, G] in
  the model dtype, ``weight_shape`` int64 [2], ``weight_zero_point`` int32 [N*b/32, G] when asymmetric,
  ``weight_g_idx`` int32 [K] with ``actorder: group``; ``float-quantized`` / ``int-quantized``: 8-bit
  ``weight`` [N, K] with ``weight_scale`` per tensor [1], channel [N, 1], group [N, G] or block
  [ceil(N/bn), ceil(K/bk)]; static activations add ``input_scale`` [1]; ``nvfp4-pack-quantized``:
  ``weight_packed`` uint8 [N, K/2], ``weight_scale`` fp8 [N, K/16], ``weight_global_scale`` and
  ``input_global_scale`` fp32 [1].
* ``fp8`` — transformers ``FineGrainedFP8Config`` / vLLM ``fp8.py``: ``weight`` float8_e4m3fn [N, K] and,
  with ``weight_block_size`` [bn, bk] (DeepSeek-V3), ``weight_scale_inv`` fp32 [ceil(N/bn), ceil(K/bk)];
  without it a per-tensor fp32 ``weight_scale`` [1]; ``activation_scheme: static`` adds ``input_scale``.
* ``fbgemm_fp8`` — ``weight`` fp8 [N, K], ``weight_scale`` fp32 [N, 1] (Llama 3.1 405B FP8).
* ``mxfp4`` — gpt-oss (transformers ``integrations/mxfp4.py``): ``*_blocks`` uint8 [N, K/32, 16] and
  ``*_scales`` uint8 (E8M0) [N, K/32]: 4.25 bits per weight.
* ``bitsandbytes`` 4-bit — ``bitsandbytes/functional.py: quantize_4bit`` and transformers
  ``BitsAndBytesConfig`` (defaults: ``bnb_4bit_quant_type="fp4"``, ``bnb_4bit_use_double_quant=False``):
  packed uint8 [ceil(K*N/2), 1], ``absmax`` fp32 [ceil(K*N/64)] — or, with double quantization, uint8
  absmax plus ``nested_absmax`` fp32 [ceil(blocks/256)] and ``nested_quant_map`` fp32 [256] —
  ``quant_map`` fp32 [16]; 8-bit (LLM.int8): ``weight`` int8 [N, K] and ``SCB`` fp32 [N].
* ``hqq`` — ``hqq/core/quantize.py: HQQLinear``: packed uint8 [K*N*b/8] plus fp16 ``scale`` and ``zero``
  [K*N/group, 1].
* ``torchao`` — ``Int4WeightOnlyConfig`` (tensor-core tiled): packed int4 [N*K/2] bytes and bf16
  ``scale_and_zero`` [K/g, N, 2]; ``Int8WeightOnlyConfig``: int8 [N, K] + bf16 scale [N];
  float8 configs: fp8 [N, K] + fp32 scale [N].

Biases stay in 16-bit in every format (counted with the dense parameters). Pure Python, no torch.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigError, WorkloadError

__all__ = ["DTYPE_BYTES", "LinearQuant", "Quantization", "flag_quantization", "quantization_from_config"]

# Bytes per element of safetensors / torch dtypes (sub-byte formats are stored packed in uint8/int32).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}

Tensor = tuple[str, str, tuple[int, ...]]  # (name suffix, safetensors dtype, shape)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class LinearQuant:
    """How one quantized linear layer is stored: its format and parameters."""

    format: str  # gptq | awq | ct-pack | ct-int8 | ct-fp8 | ct-nvfp4 | fp8 | fbgemm-fp8 | mxfp4 | bnb-4bit |
    #              bnb-int8 | hqq | torchao-int4 | torchao-int8 | torchao-fp8
    bits: int = 4
    group_size: int = 128  # elements of K under one scale; 0: one per output channel; -1: one per tensor
    sym: bool = True
    g_idx: bool = False  # GPTQ-style activation-order index saved with the weight
    double_quant: bool = False  # bitsandbytes 4-bit: quantized absmax
    quant_type: str = "nf4"  # bitsandbytes 4-bit: nf4 | fp4
    block: tuple[int, int] = (0, 0)  # fp8 block-wise scales (weight_block_size)
    scale_dtype: str = "BF16"  # compressed-tensors: scales in the model dtype
    static_input: bool = False  # a static activation scale is saved per layer

    @property
    def label(self) -> str:
        return f"{self.format}-{self.bits}bit" + (f"-g{self.group_size}" if self.group_size > 0 else "")

    def groups(self, k: int) -> int:
        if self.group_size > 0:
            return _ceil(k, self.group_size)
        return 1

    def tensors(self, k: int, n: int) -> tuple[Tensor, ...]:
        """The checkpoint tensors of one K-in, N-out linear (suffixes after the module name)."""
        b, f = self.bits, self.format
        g = self.groups(k)
        out: list[Tensor] = []
        if f == "gptq":
            out = [("qweight", "I32", (k * b // 32, n)), ("qzeros", "I32", (g, n * b // 32)),
                   ("scales", "F16", (g, n)), ("g_idx", "I32", (k,))]
        elif f == "awq":
            out = [("qweight", "I32", (k, n * b // 32)), ("qzeros", "I32", (g, n * b // 32)), ("scales", "F16", (g, n))]
        elif f == "ct-pack":
            out = [("weight_packed", "I32", (n, _ceil(k * b, 32))), ("weight_scale", self.scale_dtype, (n, g)),
                   ("weight_shape", "I64", (2,))]
            if not self.sym:
                out.append(("weight_zero_point", "I32", (_ceil(n * b, 32), g)))
            if self.g_idx:
                out.append(("weight_g_idx", "I32", (k,)))
        elif f in ("ct-int8", "ct-fp8"):
            out = [("weight", "I8" if f == "ct-int8" else "F8_E4M3", (n, k)),
                   ("weight_scale", self.scale_dtype, self._scale_shape(k, n))]
            if not self.sym:
                out.append(("weight_zero_point", "I8", self._scale_shape(k, n)))
        elif f == "ct-nvfp4":
            out = [("weight_packed", "U8", (n, k // 2)), ("weight_scale", "F8_E4M3", (n, _ceil(k, 16))),
                   ("weight_global_scale", "F32", (1,)), ("input_global_scale", "F32", (1,))]
        elif f == "fp8":
            if self.block[0]:
                bn, bk = self.block
                out = [("weight", "F8_E4M3", (n, k)), ("weight_scale_inv", "F32", (_ceil(n, bn), _ceil(k, bk)))]
            else:
                out = [("weight", "F8_E4M3", (n, k)), ("weight_scale", "F32", (1,))]
        elif f == "fbgemm-fp8":
            out = [("weight", "F8_E4M3", (n, k)), ("weight_scale", "F32", (n, 1))]
        elif f == "mxfp4":
            out = [("blocks", "U8", (n, _ceil(k, 32), 16)), ("scales", "U8", (n, _ceil(k, 32)))]
        elif f == "bnb-4bit":
            numel = k * n
            blocks = _ceil(numel, 64)
            out = [("weight", "U8", (_ceil(numel, 2), 1))]
            if self.double_quant:
                out += [("weight.absmax", "U8", (blocks,)), ("weight.nested_absmax", "F32", (_ceil(blocks, 256),)),
                        ("weight.nested_quant_map", "F32", (256,))]
            else:
                out.append(("weight.absmax", "F32", (blocks,)))
            out.append(("weight.quant_map", "F32", (16,)))
        elif f == "bnb-int8":
            out = [("weight", "I8", (n, k)), ("SCB", "F32", (n,))]
        elif f == "hqq":
            numel = k * n
            per_byte = 8 // b if b in (1, 2, 4, 8) else 0
            packed = ("W_q", "U8", (_ceil(numel, per_byte),)) if per_byte else ("W_q", "I32", (_ceil(numel, 10),))
            gs = self.group_size if self.group_size > 0 else k
            out = [packed, ("scale", "F16", (_ceil(numel, gs), 1)), ("zero", "F16", (_ceil(numel, gs), 1))]
        elif f == "torchao-int4":
            out = [("weight.packed", "U8", (n * k // 2,)), ("weight.scale_and_zero", "BF16", (g, n, 2))]
        elif f == "torchao-int8":
            out = [("weight.int_data", "I8", (n, k)), ("weight.scale", "BF16", (n,))]
        elif f == "torchao-fp8":
            out = [("weight.float8_data", "F8_E4M3", (n, k)), ("weight.scale", "F32", (n,))]
        else:
            raise ValueError(f)
        if self.static_input:
            out.append(("input_scale", "F32", (1,)))
        return tuple(out)

    def _scale_shape(self, k: int, n: int) -> tuple[int, ...]:
        if self.block[0]:
            return (_ceil(n, self.block[0]), _ceil(k, self.block[1]))
        if self.group_size > 0:
            return (n, self.groups(k))
        if self.group_size == 0:
            return (n, 1)
        return (1,)

    def bytes(self, k: int, n: int) -> tuple[int, int]:
        """(weight bytes, quantization-constant bytes) of one linear: the packed weight and the rest."""
        weight = const = 0
        for name, dtype, shape in self.tensors(k, n):
            size = math.prod(shape) * DTYPE_BYTES[dtype]
            if name in _WEIGHT_TENSORS:
                weight += size
            else:
                const += size
        return weight, const


_WEIGHT_TENSORS = frozenset({"qweight", "weight_packed", "weight", "blocks", "W_q", "weight.packed",
                             "weight.int_data", "weight.float8_data"})


def _matches(name: str, pattern: str) -> bool:
    """compressed-tensors ``re:`` patterns, transformers' glob and module-name containment."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if "*" in pattern or "?" in pattern:
        globs = (pattern, "*." + pattern, pattern + ".*", "*." + pattern + ".*")
        return any(fnmatch.fnmatchcase(name, g) for g in globs)
    return name == pattern or name.endswith("." + pattern) or f".{pattern}." in f".{name}." or \
        name.startswith(pattern + ".")


@dataclass(frozen=True, slots=True)
class Quantization:
    """Which linears of a model are quantized, and how (a checkpoint's ``quantization_config``)."""

    method: str  # the config's quant_method (or the --weights-quant flag)
    default: LinearQuant | None  # the scheme of every targeted linear without a more specific group
    groups: tuple[tuple[tuple[str, ...], LinearQuant], ...] = ()  # per-layer schemes: (targets, scheme)
    ignore: tuple[str, ...] = ()  # modules left unquantized
    lm_head: bool = False  # the output head is quantized too
    experts_only: bool = False  # only MoE expert weights are quantized (mxfp4)
    source: str = "flag"

    def scheme_for(self, module: str) -> LinearQuant | None:
        """The scheme of the linear called ``module`` (HF module path), or None if it stays 16-bit."""
        if any(_matches(module, p) for p in self.ignore):
            return None
        if module.endswith("lm_head") and not self.lm_head:
            return None
        if self.experts_only and ".experts." not in module:
            return None
        found = self.default
        for targets, scheme in self.groups:
            if any(t == "Linear" or _matches(module, t) for t in targets):
                found = scheme
                break
        if found is not None and found.format.startswith("bnb-") and ".experts." in module:
            # bitsandbytes replaces nn.Linear (and Conv1D) modules only (transformers 5.24
            # integrations/bitsandbytes.py replace_with_bnb_linear; quantizer_bnb_4bit.py param_needs_quantization
            # asks for a Linear4bit): the fused 3-D expert parameters of transformers 5 MoE layers stay unquantized
            # (bitsandbytes-foundation/bitsandbytes#1849)
            return None
        return found

    def describe(self) -> str:
        schemes = [s for _, s in self.groups] or ([self.default] if self.default else [])
        text = f"{self.method} ({', '.join(sorted({s.label for s in schemes}))})"
        if self.ignore:
            text += f", left in 16-bit: {', '.join(self.ignore[:6])}" + (" …" if len(self.ignore) > 6 else "")
        return text

    def with_ignore(self, extra: tuple[str, ...]) -> Quantization:
        return replace(self, ignore=self.ignore + extra)


# ---------------------------------------------------------------------------- command-line schemes

FLAG_SCHEMES: dict[str, LinearQuant] = {
    "gptq-int4": LinearQuant("gptq", 4, 128), "gptq-int8": LinearQuant("gptq", 8, 128),
    "awq-int4": LinearQuant("awq", 4, 128),
    "w4a16": LinearQuant("ct-pack", 4, 128), "w8a8-int8": LinearQuant("ct-int8", 8, 0, scale_dtype="F32"),
    "w8a8-fp8": LinearQuant("ct-fp8", 8, 0), "nvfp4": LinearQuant("ct-nvfp4", 4, 16),
    "fp8-block": LinearQuant("fp8", 8, -1, block=(128, 128)), "mxfp4": LinearQuant("mxfp4", 4, 32),
    "fp4": LinearQuant("bnb-4bit", 4, 64, quant_type="fp4"),
    "hqq-int4": LinearQuant("hqq", 4, 64), "torchao-int4": LinearQuant("torchao-int4", 4, 128),
}


def flag_quantization(flag: str, group_size: int | None = None, double_quant: bool = False) -> Quantization:
    """The :class:`Quantization` that ``--weights-quant FLAG [--quant-group-size G] [--double-quant]`` means."""
    if flag == "nf4":
        scheme = LinearQuant("bnb-4bit", 4, 64, quant_type="nf4", double_quant=double_quant)
    elif flag == "int8":
        scheme = LinearQuant("bnb-int8", 8, 0)
    elif flag == "fp8":
        scheme = LinearQuant("fp8", 8, -1)
    elif flag in FLAG_SCHEMES:
        scheme = FLAG_SCHEMES[flag]
        if flag == "fp4":
            scheme = replace(scheme, double_quant=double_quant)
    else:
        raise WorkloadError(f"--weights-quant {flag!r} is not one of: nf4, int8, fp8, {', '.join(FLAG_SCHEMES)}")
    if group_size is not None:
        if scheme.format not in ("gptq", "awq", "ct-pack", "hqq", "torchao-int4"):
            raise WorkloadError(f"--quant-group-size applies to gptq/awq/w4a16/hqq/torchao, not {flag}")
        scheme = replace(scheme, group_size=group_size)
    return Quantization(flag, scheme, experts_only=flag == "mxfp4", source="flag")


# ---------------------------------------------------------------------------- config.json readers

def _int(q: Mapping[str, Any], key: str, default: int, where: str, lo: int = -1, hi: int = 1 << 20) -> int:
    v = q.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{where}: quantization_config.{key} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _names(q: Mapping[str, Any], *keys: str, where: str) -> tuple[str, ...]:
    for key in keys:
        v = q.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: quantization_config.{key} must be a list of module names")
        return tuple(v)
    return ()


def _ct_scheme(w: Mapping[str, Any], fmt: str, acts: Any, model_dtype: str, where: str) -> LinearQuant:
    """One compressed-tensors ``config_groups`` entry's weights (and activations) as a :class:`LinearQuant`."""
    if not isinstance(w, Mapping):
        raise ConfigError(f"{where}: compressed-tensors config_groups.*.weights must be an object")
    bits = _int(w, "num_bits", 8, where, 1, 16)
    kind = w.get("type", "int")
    strategy = w.get("strategy", "tensor")
    gs = {"group": _int(w, "group_size", 128, where, 1), "channel": 0, "tensor": -1,
          "tensor_group": _int(w, "group_size", 16, where, 1), "block": -1}.get(str(strategy))
    if gs is None:
        raise ConfigError(f"{where}: compressed-tensors weight strategy {strategy!r} is not supported")
    block = (0, 0)
    if strategy == "block":
        bs = w.get("block_structure") or [128, 128]
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(x, int) and x > 0 for x in bs)):
            raise ConfigError(f"{where}: compressed-tensors block_structure must be two positive integers")
        block = (bs[0], bs[1])
    sym = bool(w.get("symmetric", True))
    static_in = isinstance(acts, Mapping) and acts.get("dynamic") is False
    if fmt.startswith("nvfp4") or (kind == "float" and bits == 4):
        return LinearQuant("ct-nvfp4", 4, 16)
    if kind == "float" and bits == 8:
        return LinearQuant("ct-fp8", 8, gs, sym=True, block=block, scale_dtype=model_dtype, static_input=static_in)
    if bits == 8 and fmt in ("int-quantized", "naive-quantized"):
        return LinearQuant("ct-int8", 8, gs, sym=sym, block=block, scale_dtype=model_dtype, static_input=static_in)
    return LinearQuant("ct-pack", bits, gs, sym=sym, g_idx=w.get("actorder") == "group", scale_dtype=model_dtype,
                       static_input=static_in)


def _torchao(q: Mapping[str, Any], where: str) -> LinearQuant:
    qt = q.get("quant_type")
    kwargs = q.get("quant_type_kwargs") or {}
    if isinstance(qt, Mapping):  # transformers >= 4.51: {"default": {"_type": "Int4WeightOnlyConfig", "_data": {...}}}
        inner = qt.get("default", next(iter(qt.values()), {}))
        name = str(inner.get("_type", "")) if isinstance(inner, Mapping) else ""
        kwargs = inner.get("_data", {}) if isinstance(inner, Mapping) else {}
    else:
        name = str(qt)
    low = name.lower()
    if "int4" in low:
        return LinearQuant("torchao-int4", 4, _int(kwargs, "group_size", 128, where, 1))
    if "int8" in low:
        return LinearQuant("torchao-int8", 8, 0)
    if "float8" in low or "fp8" in low:
        return LinearQuant("torchao-fp8", 8, 0)
    raise ConfigError(f"{where}: torchao quant_type {name!r} is not supported; "
                      "supported: int4/int8 weight-only, float8")


def quantization_from_config(raw: Mapping[str, Any], where: str = "config.json") -> Quantization | None:
    """Read ``quantization_config`` (or ``compression_config``) of a config.json; None when absent."""
    q = raw.get("quantization_config") or raw.get("compression_config")
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ConfigError(f"{where}: quantization_config must be a JSON object")
    dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(
        str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"), "BF16")
    method = str(q.get("quant_method", "bitsandbytes" if ("load_in_4bit" in q or "load_in_8bit" in q) else ""))
    ignore = _names(q, "modules_to_not_convert", "ignore", "ignored_layers", "llm_int8_skip_modules",
                    "skip_modules", where=where)
    if method == "gptq":
        bits = _int(q, "bits", 4, where, 2, 8)
        gs = _int(q, "group_size", 128, where)
        scheme = LinearQuant("gptq", bits, 0 if gs == -1 else gs, sym=bool(q.get("sym", True)),
                             g_idx=True)
        return Quantization(method, scheme, ignore=ignore, lm_head=bool(q.get("lm_head", False)), source=where)
    if method == "awq":
        bits = _int(q, "bits", _int(q, "w_bit", 4, where, 2, 8), where, 2, 8)
        gs = _int(q, "group_size", _int(q, "q_group_size", 128, where), where)
        version = str(q.get("version", "gemm")).lower()
        if version not in ("gemm", "gemv", "gemv_fast", "exllama", "ipex"):
            raise ConfigError(f"{where}: awq version {version!r} is not supported")
        return Quantization(method, LinearQuant("awq", bits, 0 if gs == -1 else gs), ignore=ignore, source=where)
    if method == "compressed-tensors":
        fmt = str(q.get("format", "pack-quantized"))
        groups_raw = q.get("config_groups") or {}
        if not isinstance(groups_raw, Mapping) or not groups_raw:
            raise ConfigError(f"{where}: compressed-tensors config needs config_groups")
        groups: list[tuple[tuple[str, ...], LinearQuant]] = []
        lm_head = False
        for gname, g in groups_raw.items():
            if not isinstance(g, Mapping) or not isinstance(g.get("targets"), list):
                raise ConfigError(f"{where}: config_groups.{gname} needs a targets list")
            if g.get("weights") is None:
                continue  # activation-only group: weights stay 16-bit
            targets = tuple(str(t) for t in g["targets"])
            groups.append((targets, _ct_scheme(g["weights"], str(g.get("format") or fmt),
                                               g.get("input_activations"), dtype, f"{where} {gname}")))
            lm_head = lm_head or any(t == "Linear" or "lm_head" in t for t in targets)
        return Quantization(method, None, tuple(groups), ignore=ignore, lm_head=lm_head, source=where)
    if method in ("fp8", "fbgemm_fp8"):
        if method == "fbgemm_fp8":
            return Quantization(method, LinearQuant("fbgemm-fp8", 8, 0), ignore=ignore, source=where)
        bs = q.get("weight_block_size")
        block = (0, 0)
        if bs is not None:
            if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(x, int) and x > 0 for x in bs)):
                raise ConfigError(f"{where}: weight_block_size must be two positive integers")
            block = (bs[0], bs[1])
        static = q.get("activation_scheme", "dynamic") == "static"
        return Quantization(method, LinearQuant("fp8", 8, -1, block=block, static_input=static), ignore=ignore,
                            source=where)
    if method == "mxfp4":
        return Quantization(method, LinearQuant("mxfp4", 4, 32), ignore=ignore, experts_only=True, source=where)
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            # transformers BitsAndBytesConfig defaults: quant type fp4, no double quantization
            qt = str(q.get("bnb_4bit_quant_type", "fp4"))
            if qt not in ("fp4", "nf4"):
                raise ConfigError(f"{where}: bnb_4bit_quant_type must be fp4 or nf4, got {qt!r}")
            scheme = LinearQuant("bnb-4bit", 4, 64, quant_type=qt,
                                 double_quant=bool(q.get("bnb_4bit_use_double_quant", False)))
        elif q.get("load_in_8bit"):
            scheme = LinearQuant("bnb-int8", 8, 0)
        else:
            raise ConfigError(f"{where}: bitsandbytes config sets neither load_in_4bit nor load_in_8bit")
        return Quantization(f"bitsandbytes-{scheme.quant_type if scheme.bits == 4 else 'int8'}", scheme,
                            ignore=ignore or ("lm_head",), source=where)
    if method == "hqq":
        qc = q.get("quant_config") or {}
        wq = qc.get("weight_quant_params", qc) if isinstance(qc, Mapping) else {}
        if not isinstance(wq, Mapping):
            wq = {}
        bits = _int(wq, "nbits", _int(q, "nbits", 4, where, 1, 8), where, 1, 8)
        gs = _int(wq, "group_size", _int(q, "group_size", 64, where, 1), where, 1)
        return Quantization(method, LinearQuant("hqq", bits, gs), ignore=ignore or ("lm_head",), source=where)
    if method == "torchao":
        return Quantization(method, _torchao(q, where), ignore=ignore or ("lm_head",), source=where)
    raise ConfigError(f"{where}: quant_method {method!r} is not supported; supported: gptq, awq, compressed-tensors, "
                      "fp8, fbgemm_fp8, mxfp4, bitsandbytes, hqq, torchao")


# ---------------------------------------------------------------------------- module paths

_ATTN_PREFIX = {"gpt2": "transformer.h.{i}.attn", "gptj": "transformer.h.{i}.attn", "bloom":
                "transformer.h.{i}.self_attention", "falcon": "transformer.h.{i}.self_attention",
                "gpt_neox": "gpt_neox.layers.{i}.attention", "opt": "model.decoder.layers.{i}.self_attn"}
_MLP_PREFIX = {"gpt2": "transformer.h.{i}.mlp", "gptj": "transformer.h.{i}.mlp", "bloom": "transformer.h.{i}.mlp",
               "falcon": "transformer.h.{i}.mlp", "gpt_neox": "gpt_neox.layers.{i}.mlp",
               "opt": "model.decoder.layers.{i}", "mixtral": "model.layers.{i}.block_sparse_moe"}
_MOE_NAMES = {"router": "gate", "shared_gate_proj": "shared_expert.gate_proj", "shared_up_proj":
              "shared_expert.up_proj", "shared_down_proj": "shared_expert.down_proj"}


def module_path(family: str, layer: int, name: str, attention: bool) -> str:
    """The Hugging Face module path of linear ``name`` (vramplan.params' naming) in decoder layer ``layer``,
    as quantization configs name modules (``model.layers.3.self_attn.q_proj``; experts as ``experts.0.*``)."""
    if attention:
        return _ATTN_PREFIX.get(family, "model.layers.{i}.self_attn").format(i=layer) + "." + name
    prefix = _MLP_PREFIX.get(family, "model.layers.{i}.mlp").format(i=layer)
    if name.startswith("experts."):
        proj = name.split(".", 1)[1]
        if family == "mixtral":
            proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
        return f"{prefix}.experts.0.{proj}"
    return f"{prefix}.{_MOE_NAMES.get(name, name)}"
