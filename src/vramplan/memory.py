"""Memory of model states: weights (dense and quantized), gradients, optimizer states and step temporaries.

Each function returns integer bytes and cites the code path it mirrors.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._files import package_data
from .errors import WorkloadError
from .params import ParamCounts, attention_linears, count_params, no_grad_linears, no_grad_params
from .spec import ModelSpec
from .workload import Method, Optimizer, WeightsQuant, Workload

if TYPE_CHECKING:  # (vramplan.quant is imported where a quantized model is sized: a 16-bit estimate never does)
    from .quant import LinearQuant, Quantization

__all__ = ["ModelStates", "effective_quantization", "lora_params", "model_states", "quantized_linear_bytes"]

BNB_OPT_BLOCK = 256  # bitsandbytes 8-bit optimizers: blockwise quantization of states
BNB_MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep 32-bit optimizer states


def quantized_linear_bytes(numel: int, out_features: int, quant: WeightsQuant,
                           double_quant: bool = True) -> tuple[int, int]:
    """(weight bytes, quantization-constant bytes) of one quantized linear weight of ``numel`` elements and
    ``out_features`` rows, in the layout of :mod:`vramplan.quant` (``--weights-quant`` schemes)."""
    from .quant import flag_quantization

    scheme = flag_quantization(quant.value, None, double_quant).default
    assert scheme is not None
    return scheme.bytes(numel // out_features, out_features)


def effective_quantization(spec: ModelSpec, w: Workload) -> Quantization | None:
    """The base weights' storage: ``--weights-quant`` when given (every decoder linear), else the checkpoint's
    own ``quantization_config`` (``spec.quantization``), else None (16-bit)."""
    if w.base_quant is not WeightsQuant.NONE:
        if spec.quantization is not None:
            raise WorkloadError(f"{spec.name} is already quantized ({spec.quantization.method}, from its "
                                "config.json); drop --weights-quant")
        from .quant import flag_quantization

        return flag_quantization(w.base_quant.value, w.quant_group_size, w.uses_double_quant)
    if spec.quantization is not None and spec.quantization.method == "mxfp4" and w.is_train:
        # transformers cannot train MXFP4 weights (quantizer_mxfp4.py is_trainable): training loads the checkpoint
        # with Mxfp4Config(dequantize=True), the experts in bf16
        return None
    return spec.quantization


@functools.lru_cache(maxsize=1024)
def lora_targets(spec: ModelSpec, targets: tuple[str, ...]) -> frozenset[str]:
    """Module names that carry adapters. ``all-linear`` is every linear but the output head (peft). Named targets
    that match no linear are ignored as long as one does (peft's inject_adapter raises only when none matches,
    tuners_utils.py: "Target modules ... not found in the base model"): :func:`unmatched_lora_targets` names them."""
    names = _linear_names(spec)
    if targets == ("default",):
        targets = default_lora_targets(spec)
    if "all-linear" in targets:
        chosen = frozenset(names)
        pattern = peft_moe_pattern(spec)
        if pattern is not None:
            chosen = _fused_moe_targets(spec, chosen, pattern)
    else:
        pattern = peft_moe_pattern(spec)
        moved = _moved_moe_targets(spec, targets, pattern) if pattern is not None else frozenset()
        if moved:
            targets = tuple(t for t in targets if t not in pattern["targets"])  # type: ignore[index]
        unknown = [t for t in targets if t not in names]
        if unknown and len(unknown) == len(targets) and not moved:
            # (DeepSeek-V4: peft cannot adapt o_a_proj, so neither it nor all-linear is offered)
            offer = "name some of" if spec.dsv4 else "use all-linear or some of"
            raise WorkloadError(f"LoRA target {', '.join(unknown)} is not a linear of {spec.name} "
                                f"({spec.family}); {offer}: "
                                f"{', '.join(sorted(names - {'o_a_proj'} if spec.dsv4 else names))}")
        chosen = frozenset(t for t in targets if t in names) | moved
    if spec.dsv4 and "o_a_proj" in chosen:
        # peft 0.21 wraps DeepseekV4GroupedLinear (an nn.Linear subclass) as a plain lora.Linear: its adapter output,
        # (..., o_groups x o_lora_rank), does not broadcast to the grouped result (..., o_groups, o_lora_rank)
        raise WorkloadError(f"peft cannot apply LoRA to o_a_proj of {spec.family} (DeepseekV4GroupedLinear: peft wraps "
                            "it as a plain lora.Linear and the forward fails); name the targets without it, e.g. "
                            "q_a_proj,q_b_proj,kv_proj,o_b_proj")
    if spec.family in _PEFT_MAMBA_TYPES and "out_proj" in chosen:
        # peft tuners_utils.py _check_lora_target_modules_mamba refuses LoRA on a Mamba mixer's out_proj
        raise WorkloadError(f"peft refuses LoRA on out_proj of {spec.family} models (Mamba mixers); target in_proj "
                            "(and the attention / MLP projections) instead")
    return chosen


@functools.cache
def _peft_lora_defaults() -> dict[str, Any]:
    text = package_data("data", "peft_lora_defaults.json").read_text(encoding="utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def peft_default_key(spec: ModelSpec) -> str:
    """The model_type peft looks its default targets up by: the top-level config's (a vision-language model's own)."""
    return spec.multimodal.model_type if spec.multimodal is not None else spec.family


def peft_default_targets(spec: ModelSpec) -> tuple[str, ...] | None:
    """peft's own default LoRA targets for the model (``data/peft_lora_defaults.json``: peft's
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), None where peft has none (``LoraConfig`` without
    ``target_modules`` raises then). A regular expression (Gemma 4: the language model's ``(q_proj|v_proj)``) gives
    its alternatives."""
    value = _peft_lora_defaults()["targets"].get(peft_default_key(spec))
    if value is None:
        return None
    if isinstance(value, str):
        group = re.search(r"\(([\w|]+)\)", value)
        return tuple(group.group(1).split("|")) if group else None
    return tuple(value)


def default_lora_targets(spec: ModelSpec) -> tuple[str, ...]:
    """``--lora-targets default``: peft's default for the model where it has one; otherwise the attention's query and
    value projections as peft's LLaMA-style entries name them (the fused q/k/v projection where the model has one),
    which :func:`vramplan.estimator` states as an assumption of its own."""
    own = peft_default_targets(spec)
    if own is not None:
        return own
    fused = {"gpt2": ("c_attn",), "phi3": ("qkv_proj",)}
    return (spec.qkv_name,) if spec.qkv_fused and spec.qkv_name else \
        fused.get(spec.family, ("query_key_value",) if spec.qkv_fused else ("q_proj", "v_proj"))


@functools.lru_cache(maxsize=1024)
def _linear_names(spec: ModelSpec) -> frozenset[str]:
    """The names of the model's nn.Linear modules peft can adapt (all-linear: all of them)."""
    from .params import attention_linears, layer_linears, mlp_linears

    if spec.dsv4:  # DeepSeek-V4: peft's leaf names over every kind of layer (vramplan.dsv4)
        from .dsv4 import dsv4_linear_names

        return dsv4_linear_names(spec)

    names = {n for n, *_ in attention_linears(spec)} if spec.attention_layers else set()
    if spec.mixers:  # hybrid / state-space layers: their mixers' linears (in_proj, out_proj)
        names |= {n for i in range(spec.num_layers) for n, *_ in layer_linears(spec, i)
                  if not n.startswith("experts.") and n != "router"}
    if len(spec.moe_layers) < spec.num_layers and len(spec.mlp_free_layers) < spec.num_layers:  # a dense MLP
        names |= {n for n, *_ in mlp_linears(spec, False)}
    if spec.is_moe:
        # experts and router are not nn.Linear in transformers 5.x; shared experts are
        names |= {n for n, *_ in mlp_linears(spec, True) if not n.startswith("experts.") and n != "router"}
    return frozenset(names)


def unmatched_lora_targets(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Named LoRA targets that match no linear of the model (peft ignores them when another one matches)."""
    if "all-linear" in targets or targets == ("default",):
        return ()
    pattern = peft_moe_pattern(spec)
    moving = set(pattern["targets"]) if pattern is not None else set()
    names = _linear_names(spec)
    return tuple(t for t in targets if t not in names and t not in moving)


@functools.cache
def _peft_moe_table() -> dict[str, Any]:
    text = package_data("data", "peft_moe_targets.json").read_text(encoding="utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def peft_moe_pattern(spec: ModelSpec) -> dict[str, Any] | None:
    """peft's rewrite of LoRA targets for the model's fused MoE layers (``data/peft_moe_targets.json``), or None
    where peft leaves the targets alone."""
    if not spec.is_moe:
        return None
    table = _peft_moe_table()
    name = table["types"].get(spec.family)
    return None if name is None else dict(table["patterns"][name])


def _check_param_wrapper(spec: ModelSpec, w: Workload) -> None:
    """What peft's ``lora.ParamWrapper`` refuses (tuners/lora/layer.py, peft 0.21.2: ``ValueError`` in __init__), and
    base-weight formats whose fused expert stacks are not known to be left in 16 bits (bitsandbytes leaves them)."""
    what = "lora_dropout > 0" if w.lora_dropout else "DoRA" if w.method is Method.DORA else \
        f"{w.base_quant} weights" if w.base_quant not in (WeightsQuant.NONE, WeightsQuant.NF4, WeightsQuant.FP4,
                                                          WeightsQuant.INT8) else None
    if what:
        raise WorkloadError(f"peft puts all-linear LoRA of {spec.family} on the fused expert parameters "
                            f"(ParamWrapper), which does not work with {what}; name the attention projections as "
                            "LoRA targets (e.g. q_proj,k_proj,v_proj,o_proj) instead")


# the estimator's names of the MLP linears peft knows by their v4 leaf names
_V4_LEAF = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj", "shared_gate_proj": "gate_proj",
            "shared_up_proj": "up_proj", "shared_down_proj": "down_proj"}


def _fused_moe_targets(spec: ModelSpec, chosen: frozenset[str], pattern: dict[str, Any]) -> frozenset[str]:
    """``all-linear`` on a model whose MoE layers transformers 5 fuses, as peft 0.21 resolves it
    (utils/transformers_weight_conversion.py ``_convert_peft_config_moe``): the v4 expert and router names join the
    targets and move to ``target_parameters`` — the fused ``experts.gate_up_proj`` (rank and alpha doubled: two v4
    projections fused), ``experts.down_proj`` and the router's ``gate.weight``, adapted by ``lora.ParamWrapper`` —
    and every module whose leaf name is one of those v4 names (a dense MLP's or a shared expert's
    gate/up/down_proj under the Qwen2-MoE pattern) loses its adapter."""
    moved = set(pattern["moved"])
    kept = frozenset(n for n in chosen if _V4_LEAF.get(n, n) not in moved)
    experts = {"experts.gate_up_proj", "experts.down_proj"} if spec.expert_glu != "none" else \
        {"experts.up_proj", "experts.down_proj"}
    return kept | experts | {"router"}


def _moved_moe_targets(spec: ModelSpec, targets: tuple[str, ...], pattern: dict[str, Any]) -> frozenset[str]:
    """Named LoRA targets on a model whose MoE layers transformers 5 fuses, as peft 0.21 rewrites them
    (utils/transformers_weight_conversion.py ``_convert_peft_config_moe``): a v4 expert or router name (Mixtral's
    w1/w2/w3, Qwen2-MoE's gate_proj/up_proj/down_proj, ``gate``) leaves ``target_modules`` for the fused 3-D parameter
    it became (``target_parameters``, adapted by ``lora.ParamWrapper``), so a dense MLP or shared expert of the same
    leaf name loses its adapter; naming one half of a fused pair alone is peft's ValueError."""
    mapping: dict[str, str] = pattern["targets"]
    named = {t for t in targets if t in mapping}
    for new, olds in pattern["fused"].items():
        present = named & set(olds)
        if present and present != set(olds):
            missing = ", ".join(sorted(set(olds) - present))
            raise WorkloadError(f"peft cannot adapt {', '.join(sorted(present))} of {spec.family} without {missing}: "
                                f"transformers 5 fuses them into experts.{new}; name both (or use all-linear)")
    glu = spec.expert_glu != "none"
    out = set()
    for t in named:
        new = mapping[t]
        if new == "gate.weight":
            out.add("router")
        elif new == "gate_up_proj" and not glu:
            out.add("experts.up_proj")
        else:
            out.add(f"experts.{new}")
    return frozenset(out)


# peft 0.21 tuners_utils.py _check_lora_target_modules_mamba: model types whose out_proj / conv1d take no LoRA
_PEFT_MAMBA_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})


def _modules_to_save(spec: ModelSpec, counts: ParamCounts, w: Workload) -> int:
    """Elements of the trained copies of peft ``modules_to_save`` (embed_tokens, lm_head)."""
    per = spec.vocab_size * (spec.embed_proj_dim or spec.hidden_size)
    return per * len(set(w.lora_modules_to_save))


@functools.lru_cache(maxsize=1024)
def lora_params(spec: ModelSpec, targets: frozenset[str], rank: int, dora: bool = False) -> int:
    """Adapter parameters: r x (in + out) for every targeted linear in every layer (DoRA: plus the magnitude,
    one per output feature)."""
    from .params import layer_linears

    total = 0
    for i in range(spec.num_layers):
        for name, fin, fout, count in layer_linears(spec, i):
            if name in targets:
                total += (rank * (fin + fout) + (fout if dora else 0)) * count
            elif name == "experts.gate_proj" and "experts.gate_up_proj" in targets:
                # one ParamWrapper on the fused (experts, 2 x intermediate, hidden) stack at twice the rank: A is
                # (experts x 2r, hidden), B (2 x intermediate, 2r x experts) (peft lora/layer.py ParamWrapper)
                total += 2 * rank * (fin + 2 * fout) * count
    return total


@dataclass(frozen=True, slots=True)
class ModelStates:
    """Bytes of everything that lives across steps, plus the optimizer step's temporaries."""

    parameters: int
    trainable_parameters: int
    weights: int  # 16-bit (or quantized) weights used by the forward
    master_weights: int  # fp32 parameters under AMP
    quant_constants: int
    gradients: int
    optimizer_state: int
    step_temporaries: int
    trainable_layers: int  # decoder layers whose base weights train
    notes: tuple[str, ...]
    paged_state: int = 0  # bitsandbytes paged optimizers: state bytes in CUDA unified memory (not in the above)


def _optimizer_bytes(opt: Optimizer, numel: int, elem: int, tensor_sizes: Mapping[int, int]) -> tuple[int, int, str]:
    """(state bytes, step temporary bytes, note) for ``numel`` trainable elements stored in ``elem`` bytes.

    ``tensor_sizes`` maps a trainable tensor's element count to how many tensors have it: a model with a
    million experts is a few entries, never a list the size of the model.
    """
    if opt is Optimizer.ADAMW:
        # torch.optim.AdamW foreach path (_multi_tensor_adamw): exp_avg and exp_avg_sq in the parameter
        # dtype; torch._foreach_sqrt(exp_avg_sqs) makes one parameter-sized temporary per step
        return 2 * numel * elem, numel * elem, "AdamW (foreach): 2 states in the parameter dtype + sqrt(v) temporary"
    if opt is Optimizer.ADAMW_FUSED:
        return 2 * numel * elem, 0, "AdamW fused: 2 states in the parameter dtype, no step temporary"
    if opt is Optimizer.ADAMW_8BIT:
        # bitsandbytes AdamW8bit: uint8 states with an fp32 absmax per 256-element block; tensors
        # under 4096 elements keep fp32 states (min_8bit_size)
        small = sum(n * k for n, k in tensor_sizes.items() if n < BNB_MIN_8BIT_SIZE)
        big = numel - small
        state = 2 * (big + 4 * -(-big // BNB_OPT_BLOCK)) + 2 * 4 * small
        return state, 0, "AdamW 8-bit (bitsandbytes): blockwise uint8 states, small tensors in fp32"
    if opt is Optimizer.SGD:
        return numel * elem, 0, "SGD with momentum: one momentum buffer in the parameter dtype"
    if opt is Optimizer.ADAFACTOR:
        # torch.optim.Adafactor foreach: factored row/col second moments (tiny), full variance for
        # vectors; the step builds row_var @ col_var, a parameter-sized estimate, for every tensor
        vec = sum(n * k for n, k in tensor_sizes.items() if n < 1 << 16)
        return vec * elem, numel * elem, "Adafactor (torch, foreach): factored moments + variance estimate temporary"
    if opt is Optimizer.LION:
        largest = max((n for n, k in tensor_sizes.items() if k), default=0)
        return numel * elem, largest * elem, "Lion: one momentum buffer; sign update temporary per tensor"
    if opt in (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT):
        # bitsandbytes Optimizer2State.get_state_buffer (bitsandbytes/optim/optimizer.py): paged optimizers
        # allocate the state of every tensor of >= 1e5 elements with F.get_paged (cudaMallocManaged, outside
        # PyTorch's caching allocator: max_memory_allocated never sees it, and the driver evicts it to host
        # memory under pressure); smaller tensors' states come from torch.zeros_like. 32-bit: fp32 states.
        paged = sum(n * k for n, k in tensor_sizes.items() if n >= BNB_PAGED_MIN)
        small = numel - paged
        if opt is Optimizer.PAGED_ADAMW:
            return 2 * 4 * small, 0, (f"paged AdamW 32-bit (bitsandbytes): fp32 states; {2 * 4 * paged / 2**30:.2f} "
                                      "GiB of them in CUDA unified memory (paged to the host under pressure)")
        state8, _, _ = _optimizer_bytes(Optimizer.ADAMW_8BIT, numel, elem, tensor_sizes)
        paged8 = sum(2 * n * k for n, k in tensor_sizes.items() if n >= BNB_PAGED_MIN)
        return state8 - paged8, 0, (f"paged AdamW 8-bit (bitsandbytes): blockwise uint8 states, "
                                   f"{paged8 / 2**30:.2f} GiB of them in CUDA unified memory; fp32 absmax on device")
    raise ValueError(opt)


BNB_PAGED_MIN = 100_000  # bitsandbytes: tensors with fewer elements never get paged state buffers


def paged_state_bytes(opt: Optimizer, tensor_sizes: Mapping[int, int]) -> int:
    """Bytes of a bitsandbytes paged optimizer's state that live in CUDA unified memory."""
    if opt is Optimizer.PAGED_ADAMW:
        return sum(2 * 4 * n * k for n, k in tensor_sizes.items() if n >= BNB_PAGED_MIN)
    if opt is Optimizer.PAGED_ADAMW_8BIT:
        return sum(2 * n * k for n, k in tensor_sizes.items() if n >= BNB_PAGED_MIN)
    return 0


def _matrix_optimizer_bytes(opt: Optimizer, w: Workload, elem: int, matrices: list[tuple[int, int]],
                            others: list[int]) -> tuple[int, int, str]:
    """GaLore, APOLLO and Muon act on the 2-D weights of the decoder layers (``matrices``: (out, in)); every
    other trainable tensor (embeddings, head, norms, biases: ``others``) gets AdamW's two states."""
    adam_other = 2 * sum(others) * elem
    if not matrices:
        return adam_other, sum(others) * elem, "no 2-D decoder weights train: AdamW on the rest"
    r = w.optimizer_rank
    biggest = max(matrices, key=lambda mn: mn[0] * mn[1])
    m, n = biggest
    k = min(m, n)
    if opt is Optimizer.MUON:
        # torch.optim.Muon (torch/optim/_muon.py): one momentum buffer per matrix; per tensor the Nesterov update
        # (m x n), its bf16 copy unless already bf16, and the Newton-Schulz iteration's gram matrices (k x k, twice)
        # and next iterate (m x n, bf16)
        state = sum(a * b for a, b in matrices) * elem + adam_other
        temp = m * n * elem + (m * n * 2 if elem != 2 else 0) + m * n * 2 + 2 * k * k * 2
        return state, max(temp, max(others, default=0) * elem), \
            ("Muon (torch.optim.Muon) on the decoder's 2-D weights: momentum + Newton-Schulz temporaries; "
             "AdamW on the rest")
    # GaLore (galore_torch/galore_projector.py GaLoreProjector, proj_type std): for an (m, n) gradient the
    # projection keeps rank r of the shorter side (r x min(m, n), parameter dtype) and Adam's moments live on the
    # projected gradient (r x max(m, n)); the step projects back to a full (m, n) update. APOLLO
    # (apollo_torch/apollo.py, random projection) keeps the same moments and a random projection, and scales the
    # full gradient channel-wise (an (m, n) temporary) instead of projecting back.
    rk = [(min(r, a, b), max(a, b), min(a, b)) for a, b in matrices]
    state = sum(2 * rr * big * elem + rr * small * elem for rr, big, small in rk) + adam_other
    temp = m * n * elem + 2 * min(r, k) * max(m, n) * elem
    if opt is Optimizer.GALORE:
        # every update_proj_gap steps: torch.linalg.svd of an fp32 copy of the gradient (U: m x k, Vh: k x n, fp32)
        temp += m * n * 4 + (m * k + k * n + k) * 4
        return state, temp, (f"GaLore AdamW rank {r} on the decoder's 2-D weights (SVD every {w.galore_update_gap} "
                             "steps counted in the step temporaries); AdamW on the rest")
    return state, temp, f"APOLLO AdamW rank {r} (random projection) on the decoder's 2-D weights; AdamW on the rest"


def linear_scheme(spec: ModelSpec, quantization: Quantization, layer: int, j: int, name: str) -> LinearQuant | None:
    """The quantization scheme of the ``j``-th linear kind (``name``) of decoder layer ``layer``
    (``LayerParams.linear_shapes``), or None where it stays in 16 bits: routers stay (vLLM builds them without a
    quant method); the rest as the quantization targets them (:meth:`Quantization.scheme_for`)."""
    from .quant import module_path

    if name == "router":
        return None
    n_attn = len(attention_linears(spec)) if spec.mixer(layer) == "attention" else 2
    scheme = quantization.scheme_for(module_path(spec.family, layer, name, j < n_attn))
    if scheme is not None and spec.dsv4 and name == "o_a_proj" and scheme.format.startswith("bnb-"):
        # bitsandbytes replaces modules whose type is nn.Linear exactly (transformers 5.24
        # integrations/bitsandbytes.py): DeepseekV4GroupedLinear, a subclass, stays unquantized
        return None
    return scheme


def model_states(spec: ModelSpec, w: Workload, counts: ParamCounts | None = None, *,
                 flat: bool = False) -> ModelStates:
    """Weights, master weights, quantization constants, gradients, optimizer states and step temporaries of
    ``spec`` under ``w`` (``counts``: the spec's parameter counts, :func:`count_params` when not given).

    ``flat``: the optimizer steps flat fp32 copies of every trainable parameter, so a parameter without a gradient
    has optimizer state too (DeepSpeed ZeRO's ``single_partition_of_fp32_groups``, stage_1_and_2.py / stage3.py;
    Megatron's fp32 main params, whose gradients are copied from its grad buffer, zeros included); torch's own
    optimizers create none for it (the default)."""
    return _model_states(spec, w, counts or count_params(spec), flat)


@functools.lru_cache(maxsize=4096)  # a plan search and a parallel estimate ask again for the same (model, workload)
def _model_states(spec: ModelSpec, w: Workload, counts: ParamCounts, flat: bool = False) -> ModelStates:
    total = counts.total
    notes: list[str] = []
    training = w.is_train
    prec = w.precision
    dense_elem = prec.param_bytes
    L = spec.num_layers

    # ---- what is quantized: the linears the quantization targets (--weights-quant: every linear of the
    # decoder layers; a checkpoint's quantization_config: its targets minus its ignore list)
    quantization = effective_quantization(spec, w)
    if spec.quantization is not None and spec.quantization.method == "mxfp4":
        notes.append("MXFP4 experts: " + (
            "dequantized to bf16 for training (transformers cannot train MXFP4; Mxfp4Config(dequantize=True))"
            if quantization is None else
            "kept in MXFP4, as transformers runs them on a GPU of compute capability >= 7.5 with triton >= 3.4 and "
            "the kernels package; without those it dequantizes them to bf16 at load (quantizer_mxfp4.py): "
            "the weights then take 16 bits"))
    quant_w = quant_c = quant_numel = 0
    if quantization is not None:
        block = quantization.default.block if quantization.default is not None else (0, 0)
        dsv4_fp8 = bool(spec.dsv4) and quantization.method == "fp8" and block[0] > 0
        if dsv4_fp8:  # DeepSeek-V4's fine-grained FP8 checkpoint (FP4 experts): vramplan.dsv4
            from .dsv4 import dsv4_fp8_bytes

            quant_w, quant_c, quant_numel = dsv4_fp8_bytes(spec, block)
            notes.append("DeepSeek-V4 fine-grained FP8 checkpoint as transformers 5.24 loads it: FP8Linear / "
                         "FP8GroupedLinear (block scales), experts " + ("FP4-packed (expert_dtype fp4)" if
                                                                      spec.dsv4[10] else "in fp8") +
                         "; the compressors' and indexers' projections, the routers and the lm_head in bf16")
        for i, layer in enumerate(() if dsv4_fp8 else counts.layers):
            for j, (name, fin, fout, n) in enumerate(layer.linear_shapes):
                scheme = linear_scheme(spec, quantization, i, j, name)
                if scheme is None:
                    continue
                wb, cb = scheme.bytes(fin, fout)
                quant_w += wb * n
                quant_c += cb * n
                quant_numel += fin * fout * n
        if counts.lm_head and quantization.lm_head:
            head = quantization.scheme_for("lm_head")
            if head is not None:
                d = spec.embed_proj_dim or spec.hidden_size
                wb, cb = head.bytes(d, spec.vocab_size)
                quant_w, quant_c, quant_numel = quant_w + wb, quant_c + cb, quant_numel + d * spec.vocab_size
        if spec.is_moe and quantization.default is not None and quantization.default.format.startswith("bnb-"):
            notes.append("bitsandbytes quantizes nn.Linear modules only: the fused 3-D expert stacks of transformers 5 "
                         "MoE layers stay unquantized (bitsandbytes#1849)" +
                         (", in fp32 after prepare_model_for_kbit_training" if w.method is Method.QLORA else ""))
        other = total - quant_numel
        # QLoRA: peft.prepare_model_for_kbit_training casts every remaining 16-bit parameter to fp32
        other_elem = 4 if w.method is Method.QLORA else dense_elem
        if w.method is Method.QLORA:
            notes.append("prepare_model_for_kbit_training: embeddings, norms, head and biases cast to fp32")
        if quantization.source != "flag":
            notes.append(f"weights: {quantization.describe()} (quantization_config of {quantization.source})")
        dense_w = other * other_elem
    else:
        dense_w = total * dense_elem
    ckpt = spec.checkpoint
    if ckpt is not None and ckpt.exact and w.base_quant is WeightsQuant.NONE:
        # the checkpoint's own headers: packed weights and constants as stored, floating-point weights in the
        # dtype the workload loads them in
        other_elem = 4 if w.method is Method.QLORA else dense_elem
        dense_w, quant_w, quant_c = ckpt.dense_numel * other_elem, ckpt.quantized_bytes, ckpt.constant_bytes
        notes.append(f"weights from {ckpt.files} safetensors file(s), {ckpt.tensors} tensors (headers read)")

    # ---- trainable parameters
    adapters = 0
    trainable_layers = 0
    tensor_sizes: Counter[int] = Counter()
    if not training:
        trainable = 0
    elif w.method is Method.FULL:
        trainable = total
        trainable_layers = L
        tensor_sizes = _tensor_sizes(spec, counts, range(L), embed=True, head=True)
    elif w.method is Method.FREEZE:
        k = w.trainable_layers if w.trainable_layers is not None else max(1, L // 4)
        k = min(k, L)
        trainable_layers = k
        trainable = sum(layer.total for layer in counts.layers[L - k:]) + counts.final_norm + counts.lm_head
        tensor_sizes = _tensor_sizes(spec, counts, range(L - k, L), embed=False, head=True)
        notes.append(f"freeze: the last {k} of {L} decoder layers, the final norm and the untied head train")
    else:
        targets = lora_targets(spec, w.lora_targets)
        if any(t.startswith("experts.") or t == "router" for t in targets):
            _check_param_wrapper(spec, w)
            notes.append("LoRA on the fused experts and the router (peft lora.ParamWrapper, as peft 0.21 resolves "
                         "all-linear for this MoE type): every forward builds W + s*B@A the size of the whole "
                         "expert stack, saved for backward, and backward materializes its gradient")
        adapters = lora_params(spec, targets, w.lora_rank, dora=w.method is Method.DORA)
        trainable = adapters
        tensor_sizes = Counter({w.lora_rank * 4096: max(1, adapters // (w.lora_rank * 4096))})
        if w.method is Method.DORA:
            notes.append("DoRA (peft lora/dora.py): a trained fp32 magnitude per output feature of each adapted "
                         "linear; every forward rebuilds B @ A and the row norms of W + s*B@A (weight-sized fp32 "
                         "temporaries, detached)")
        if w.rslora:
            notes.append("rsLoRA: scaling alpha/sqrt(r) instead of alpha/r (no memory change)")
        saved = _modules_to_save(spec, counts, w)
        if saved:
            # peft ModulesToSaveWrapper: a trainable deep copy of the module next to the frozen original
            adapters += saved
            trainable += saved
            notes.append(f"modules_to_save {', '.join(w.lora_modules_to_save)}: trained full copies "
                         "(weights, gradients and optimizer states)")
    # peft adds the adapters to the model's parameters; they are fp32 (autocast_adapter_dtype); a
    # modules_to_save copy keeps its module's dtype
    saved_copies = _modules_to_save(spec, counts, w) if training and w.uses_adapters else 0
    copy_elem = 4 if w.method is Method.QLORA else dense_elem
    adapter_bytes = (adapters - saved_copies) * 4 + saved_copies * copy_elem
    train_elem = 4 if w.uses_adapters else dense_elem

    # buffers the model moves to the GPU with its parameters (GPTBigCodeModel's causal-mask buffer)
    weights = dense_w + quant_w + adapter_bytes + spec.buffer_bytes
    master = 0
    if prec.is_amp and training:
        master, weights = weights, 0
        notes.append("AMP: fp32 parameters (master weights); autocast's 16-bit weight copies count as weights")
    # parameters of layers the forward skips (spec.idle_layers) and of modules it never calls (spec.idle_params) get
    # no gradient: none is allocated, and the optimizer neither creates their state in its first step nor steps them
    # (torch/optim/adam.py _init_group, which AdamW inherits, and sgd.py, _adafactor.py, _muon.py: a parameter whose
    # grad is None is passed over; bitsandbytes optim/optimizer.py Optimizer8bit.step and GaLore's/APOLLO's AdamW
    # `continue` past it before their lazy state init)
    # (and parameters of modules that run under no_grad: DSA's indexers, params.no_grad_params)
    idle = _idle_trainable(spec, counts, w, trainable_layers) if training and trainable and \
        (spec.idle_layers or spec.idle_params or spec.index_heads) else 0
    grads = ((trainable - saved_copies - idle) * train_elem + saved_copies * copy_elem) if training else 0
    no_grad_fp32 = _idle_fp32(spec) if idle else 0
    if flat:  # (flat fp32 copies: every trainable parameter has state)
        idle = 0
    if idle:
        tensor_sizes = _stepped_sizes(spec, counts, w, tensor_sizes, trainable_layers, adapters - saved_copies - idle)
    state = temp = 0
    if training and trainable:
        if w.optimizer in (Optimizer.GALORE, Optimizer.APOLLO, Optimizer.MUON):
            matrices, others = _matrices(spec, counts, w, tensor_sizes)
            state, temp, note = _matrix_optimizer_bytes(w.optimizer, w, train_elem, matrices, others)
        else:
            state, temp, note = _optimizer_bytes(w.optimizer, trainable - saved_copies - idle, train_elem,
                                                 tensor_sizes)
            if saved_copies:
                per = saved_copies // len(set(w.lora_modules_to_save))
                s2, t2, _ = _optimizer_bytes(w.optimizer, saved_copies, copy_elem,
                                             Counter({per: len(set(w.lora_modules_to_save))}))
                state, temp = state + s2, max(temp, t2) if w.optimizer is Optimizer.LION else temp + t2
        notes.append(note)
    # parameters the model keeps in fp32 whatever the dtype it is loaded in (transformers'
    # _keep_in_fp32_modules_strict): their weights, and under full fine-tuning their gradients and AdamW-style states
    # (zeros_like the parameter), take 4 bytes
    # (DeepSeek-V4's fp32 modules are not linears: a quantized checkpoint keeps them in fp32 too)
    wide = spec.fp32_params if dense_elem < 4 and (quantization is None or spec.dsv4) else 0
    if wide:
        weights += wide * (4 - dense_elem)
        if training and w.method is Method.FULL:
            grads += (wide - no_grad_fp32) * (4 - dense_elem)  # (the fp32 ones with no gradient: none, nor state)
            stepped = wide - (no_grad_fp32 if idle else 0)
            if w.optimizer not in (Optimizer.GALORE, Optimizer.APOLLO, Optimizer.MUON):
                s4, t4, _ = _optimizer_bytes(w.optimizer, stepped, 4, Counter())
                s2, t2, _ = _optimizer_bytes(w.optimizer, stepped, dense_elem, Counter())
                state, temp = state + s4 - s2, temp + t4 - t2
        notes.append(f"{wide / 1e6:.1f}M parameters kept in fp32 by the model (_keep_in_fp32_modules_strict)")
    paged = paged_state_bytes(w.optimizer, tensor_sizes) if training and trainable else 0
    return ModelStates(total + adapters, trainable, weights, master, quant_c, grads, state, temp,
                       trainable_layers, tuple(notes), paged)


def _idle_trainable(spec: ModelSpec, counts: ParamCounts, w: Workload, trainable_layers: int) -> int:
    """Trainable parameters that get no gradient: those of the layers the forward skips (spec.idle_layers) and of the
    modules that run under no_grad (params.no_grad_params: DSA's indexers), their weights when they train (full
    fine-tuning; --method freeze for the top layers), else the adapters peft attached to them; under full fine-tuning
    also the idle parameters outside the layers (spec.idle_params)."""
    L = spec.num_layers
    if w.uses_adapters:
        from .params import layer_linears

        targets = lora_targets(spec, w.lora_targets)
        r = w.lora_rank
        idle = sum(r * (fin + fout) * n + (fout * n if w.method is Method.DORA else 0)
                   for i in range(L) for name, fin, fout, n in layer_linears(spec, i) if name in targets
                   and (i in spec.idle_layers or name in no_grad_linears(spec, i)))
        if spec.dsv4:  # DeepSeek-V4's indexers: their output is integer indices (vramplan.dsv4)
            from .dsv4 import dsv4_idle_adapters

            idle += dsv4_idle_adapters(spec, targets, r, w.method is Method.DORA)
        return idle
    first = L - trainable_layers
    return sum(counts.layers[i].total if i in spec.idle_layers else no_grad_params(spec, i) for i in range(first, L)) \
        + (spec.idle_params if w.method is Method.FULL else 0)


def _idle_fp32(spec: ModelSpec) -> int:
    """Of the parameters the model keeps in fp32, those with no gradient: HY-V4's indexers' weights_proj and k_norm
    (hyper._hy_v4's fp32_params) under full fine-tuning."""
    if not spec.index_fp32_weights:
        return 0
    return sum(spec.hidden_size * layer.index_heads + 2 * layer.index_head_dim
               for layer in (spec.layer(i) for i in range(spec.num_layers) if i not in spec.idle_layers)
               if layer.index_heads)


def _stepped_sizes(spec: ModelSpec, counts: ParamCounts, w: Workload, tensor_sizes: Counter[int],
                   trainable_layers: int, adapters: int) -> Counter[int]:
    """``tensor_sizes`` less the tensors of the layers the forward skips (spec.idle_layers), which get no gradient
    and so no optimizer state: their weights (full fine-tuning, freeze), or the adapters spread as the adapters'
    sizes are (``adapters``: the adapter elements that do get a gradient)."""
    if w.uses_adapters:
        r4 = w.lora_rank * 4096
        return Counter({r4: max(1, adapters // r4)})
    first = spec.num_layers - trainable_layers
    out = Counter(tensor_sizes)
    for i in range(first, spec.num_layers):
        if i in spec.idle_layers:
            out.subtract(_count_tensor_sizes(spec, counts, range(i, i + 1), embed=False, head=False))
        else:
            skip = no_grad_linears(spec, i)
            out.subtract({fin * fout: n for name, fin, fout, n in counts.layers[i].linear_shapes if name in skip})
    return +out


def _matrices(spec: ModelSpec, counts: ParamCounts, w: Workload,
              tensor_sizes: Mapping[int, int]) -> tuple[list[tuple[int, int]], list[int]]:
    """(out, in) of the trainable 2-D weights of the decoder layers, and the sizes of every other trainable tensor.
    Adapters: LoRA's A (r x in) and B (out x r) matrices."""
    if w.uses_adapters:
        r = w.lora_rank
        mats: list[tuple[int, int]] = []
        targets = lora_targets(spec, w.lora_targets)
        from .params import layer_linears

        for i in range(spec.num_layers):
            if i in spec.idle_layers:  # no gradient (memory.model_states)
                continue
            skip = no_grad_linears(spec, i)
            for name, fin, fout, n in layer_linears(spec, i):
                if name in targets and name not in skip:
                    mats += [(r, fin), (fout, r)] * n
        rest = sum(n * k for n, k in tensor_sizes.items()) - sum(a * b for a, b in mats)
        return mats, [rest] if rest > 0 else []
    L = spec.num_layers
    first = 0 if w.method is Method.FULL else L - min(L, w.trainable_layers if w.trainable_layers is not None
                                                      else max(1, L // 4))
    mats = [(fout, fin) for i, layer in enumerate(counts.layers) if i >= first and i not in spec.idle_layers
            for name, fin, fout, n in layer.linear_shapes if name not in no_grad_linears(spec, i) for _ in range(n)]
    rest = sum(n * k for n, k in tensor_sizes.items()) - sum(a * b for a, b in mats)
    sizes = {a * b for a, b in mats}
    return mats, [n for n, k in tensor_sizes.items() if n not in sizes for _ in range(k)] if rest > 0 else []


def _tensor_sizes(spec: ModelSpec, counts: ParamCounts, layers: range, *, embed: bool,
                  head: bool) -> Counter[int]:
    """Element count -> number of trainable tensors of that size (a multiset, so work is per shape); a fresh copy of
    the model's (worked out once per model and layer range when ``counts`` are the model's own)."""
    if counts is count_params(spec):
        return Counter(_model_tensor_sizes(spec, layers.start, layers.stop, embed, head))
    return _count_tensor_sizes(spec, counts, layers, embed, head)


@functools.lru_cache(maxsize=1024)
def _model_tensor_sizes(spec: ModelSpec, start: int, stop: int, embed: bool, head: bool) -> Counter[int]:
    return _count_tensor_sizes(spec, count_params(spec), range(start, stop), embed, head)


def _count_tensor_sizes(spec: ModelSpec, counts: ParamCounts, layers: range, embed: bool,
                        head: bool) -> Counter[int]:
    sizes: Counter[int] = Counter()
    for i in layers:
        layer = counts.layers[i]
        for _, fin, fout, n in layer.linear_shapes:
            sizes[fin * fout] += n
        sizes[spec.hidden_size] += layer.norm // spec.hidden_size
    if embed:
        sizes[counts.embedding] += 1
    if head and counts.lm_head:
        sizes[counts.lm_head] += 1
    return sizes

