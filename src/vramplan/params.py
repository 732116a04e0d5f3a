"""Exact parameter counts, module by module, as ``sum(p.numel() for p in model.parameters())``.

Each function mirrors the ``nn.Linear`` / ``nn.Embedding`` / norm modules that the family's
transformers modeling file creates (``modeling_llama.py``, ``modeling_gpt2.py``, …); tied
embeddings are counted once, as PyTorch's ``parameters()`` deduplicates shared tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .spec import Activation, MLPKind, ModelSpec, NormKind

__all__ = ["LayerParams", "ParamCounts", "count_params", "layer_linears", "layer_params", "no_grad_linears",
           "no_grad_params"]


@dataclass(frozen=True, slots=True)
class LayerParams:
    """Parameters of one decoder layer, split by what adapters and quantizers treat differently."""

    attn_linear: int  # weight elements of q/k/v/o projections
    mlp_linear: int  # weight elements of the MLP (all experts for MoE) and router
    bias: int  # bias elements of those linears
    norm: int  # norm weights and biases (incl. q/k norms)
    linear_shapes: tuple[tuple[str, int, int, int], ...]  # (name, in, out, count) per linear kind

    @property
    def linear(self) -> int:
        return self.attn_linear + self.mlp_linear

    @property
    def total(self) -> int:
        return self.attn_linear + self.mlp_linear + self.bias + self.norm


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Whole-model counts; ``total`` equals what PyTorch reports."""

    embedding: int  # token (+ position) embeddings and embedding norm / projections
    layers: tuple[LayerParams, ...]
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def layer_total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def total(self) -> int:
        return self.embedding + self.layer_total + self.final_norm + self.lm_head


def _norm_params(spec: ModelSpec, dim: int) -> int:
    if spec.norm in (NormKind.LAYERNORM_NO_AFFINE, NormKind.RMSNORM_NO_WEIGHT):  # OlmoLayerNorm, Llama4TextL2Norm:
        # no parameters
        return 0
    return dim * (2 if spec.norm is NormKind.LAYERNORM and spec.norm_bias else 1)


def attention_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """(module name, in_features, out_features, count) of each attention projection."""
    h, q, kv = spec.hidden_size, spec.q_dim, spec.kv_dim
    if spec.moa:  # JetMoE: the nn.Linear modules of its layers (the expert stacks are parameters: vramplan.jetmoe)
        from .jetmoe import jetmoe_adaptable

        return jetmoe_adaptable(spec)
    if spec.zaya:  # ZAYA: CCA's and the router's nn.Linear modules (vramplan.zaya)
        from .zaya import zaya_linears

        return [lin for lin in zaya_linears(spec) if not lin[0].startswith("experts.")]
    if spec.kv_lora_rank:  # modeling_deepseek_v3.py DeepseekV3Attention
        nh, qr, kvr = spec.num_heads, spec.q_lora_rank, spec.kv_lora_rank
        nope = spec.head_dim - spec.qk_rope_head_dim
        mla = [("q_a_proj", h, qr, 1), ("q_gate_proj", 2 * qr, nh * (spec.head_dim + spec.v_head_dim), 1)] \
            if qr and spec.mla_q_gate else [("q_a_proj", h, qr, 1), ("q_b_proj", qr, q, 1)] if qr else \
            [("q_proj", h, q, 1)]
        out = [*mla, ("kv_a_proj_with_mqa", h, kvr + spec.qk_rope_head_dim, 1),
               ("kv_b_proj", kvr, nh * (nope + spec.v_head_dim), 1), ("o_proj", nh * spec.v_head_dim, h, 1)]
        if spec.index_heads:  # the DSA indexer (modeling_deepseek_v32.py DeepseekV32Indexer): wq_b, wk, weights_proj
            hi, di = spec.index_heads, spec.index_head_dim
            out += [("wq_b", qr, hi * di, 1), ("wk", h, di, 1), ("weights_proj", h, hi, 1)]
        if spec.mla_head_gate:  # BailingHybridAttention's / Dots 3's g_proj: one gate per head, no bias
            out.append(("g_proj", h, nh, 1))
        if spec.mla_out_gate:  # HYV4Attention's gate_proj: one gate per value channel, no bias
            out.append(("gate_proj", h, nh * spec.v_head_dim, 1))
        if spec.gated_norm_rank:  # the gated input norm's low-rank gate MLP (AXK2GateMLP: fc1, fc2, no bias)
            out += [("fc1", h, spec.gated_norm_rank, 1), ("fc2", spec.gated_norm_rank, h, 1)]
        return out
    if spec.qkv_fused:
        name = spec.qkv_name or {"gpt2": "c_attn", "phi3": "qkv_proj"}.get(spec.family, "query_key_value")
        out = [(name, h, q + 2 * kv, 1)]
    elif spec.kv_shared:  # keys and values come from an earlier layer (modeling_gemma4.py): q_proj and o_proj only
        out = [("q_proj", h, q, 1)]
    else:  # a gated attention's q_proj also makes the per-head output gate (Qwen3-Next); k_eq_v: no v_proj (Gemma 4)
        qn, kn, vn = spec.qkv_names or ("q_proj", "k_proj", "v_proj")
        out = [(qn, h, 2 * q if spec.attn_output_gate else q, 1), (kn, h, kv, 1)] + \
            ([] if spec.v_from_k else [(vn, h, spec.v_dim, 1)])
        if spec.attn_head_gate:  # LFM3's g_proj: one gate per head, no bias
            out.append(("g_proj", h, spec.num_heads, 1))
        if spec.dynamic_mask:  # DogeAttention.dt_proj: values -> one dt per key-value head
            out.append(("dt_proj", kv, spec.num_kv_heads, 1))
        if spec.attn_gate:  # a derived output gate: heads or heads x head_dim outputs, no bias
            out.append((spec.attn_gate_name, h, spec.num_heads if spec.attn_gate_heads else q, 1))
    oname = spec.o_name or {"gpt2": "c_proj", "falcon": "dense", "gpt_neox": "dense", "bloom": "dense", "phi": "dense",
             "gptj": "out_proj", "opt": "out_proj"}.get(spec.family, "o_proj")
    out.append((oname, spec.num_heads * spec.value_head_dim if not spec.qkv_fused else q, h, 1))
    return out


def mlp_linears(spec: ModelSpec, moe: bool) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of each MLP linear; MoE counts every expert."""
    h = spec.hidden_size
    if moe:
        i, e = spec.moe_intermediate_size, spec.num_experts
        # transformers 5.x stores experts as fused 3-D parameters and the router as its own module: neither
        # is an nn.Linear (so neither gets LoRA adapters from peft's "all-linear")
        d = spec.moe_latent_size or h  # Nemotron-H: the experts work at the latent width
        if spec.expert_glu == "none":  # non-gated experts (Nemotron-H)
            out = [("experts.up_proj", d, i, e), ("experts.down_proj", i, d, e), ("router", h, e, 1)]
        else:
            out = [("experts.gate_proj", h, i, e), ("experts.up_proj", h, i, e), ("experts.down_proj", i, h, e),
                   ("router", h, e, 1)]
        if spec.moe_latent_size:
            out += [("fc1_latent_proj", h, d, 1), ("fc2_latent_proj", d, h, 1)]
        if spec.shared_expert_intermediate_size:
            si = spec.shared_expert_intermediate_size
            if spec.expert_glu == "none":
                out += [("shared_up_proj", h, si, 1), ("shared_down_proj", si, h, 1)]
            elif spec.gate_up_fused or spec.shared_expert_glu == "clamped":  # one gate_up linear (GraniteMoeHybridMLP,
            # MiniMaxM3VLDenseMLP)
                out += [("shared_gate_up_proj", h, 2 * si, 1), ("shared_down_proj", si, h, 1)]
            else:
                out += [("shared_gate_proj", h, si, 1), ("shared_up_proj", h, si, 1), ("shared_down_proj", si, h, 1)]
        if spec.shared_expert_gate:
            out.append(("shared_expert_gate", h, 1, 1))
        if spec.gated_norm_rank:  # a MoE layer's pre-MLP norm is gated too (AXK2DecoderLayer): its fc1, fc2
            out += [("fc1", h, spec.gated_norm_rank, 1), ("fc2", spec.gated_norm_rank, h, 1)]
        return out
    i = spec.intermediate_size
    if spec.mlp is MLPKind.GATED:
        if spec.gate_up_fused:
            return [("gate_up_proj", h, 2 * i, 1), ("down_proj", i, h, 1)]
        return [("gate_proj", h, i, 1), ("up_proj", h, i, 1), ("down_proj", i, h, 1)]
    names = spec.mlp_names or {"gpt2": ("c_fc", "c_proj"), "gptj": ("fc_in", "fc_out"), "opt": ("fc1", "fc2"),
                               "nemotron_h": ("up_proj", "down_proj")}.get(spec.family,
                                                                         ("dense_h_to_4h", "dense_4h_to_h"))
    return [(names[0], h, i, 1), (names[1], i, h, 1)]


def per_layer_input_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """The gated per-layer-input branch of a layer (Gemma4TextDecoderLayer): hidden -> per-layer width -> hidden."""
    p = spec.per_layer_input
    return [("per_layer_input_gate", spec.hidden_size, p, 1), ("per_layer_projection", p, spec.hidden_size, 1)] \
        if p else []


def _altup_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """Gemma 3n's per-layer AltUp and LAuReL linears (vramplan.gemma3n)."""
    if not spec.altup_inputs:
        return []
    from .gemma3n import altup_linears

    return altup_linears(spec.altup_inputs, spec.hidden_size, spec.laurel_rank)


# DeepSeek Sparse Attention's lightning indexer (modeling_deepseek_v32.py DeepseekV32Indexer; GLM-5, A.X-K2, HY-V4 and
# Dots 3 alike): its forward is decorated @torch.no_grad(), so backward gives its linears and its k_norm no gradient
DSA_INDEXER_LINEARS = frozenset({"wq_b", "wk", "weights_proj"})


def no_grad_linears(spec: ModelSpec, index: int) -> frozenset[str]:
    """The linears of layer ``index`` that run but get no gradient (a module whose forward runs under no_grad)."""
    return DSA_INDEXER_LINEARS if spec.layer(index).index_heads else frozenset()


def no_grad_params(spec: ModelSpec, index: int) -> int:
    """Parameters of layer ``index`` that run but get no gradient: the DSA indexer's linears and k_norm (a
    LayerNorm with a bias)."""
    layer = spec.layer(index)
    if not layer.index_heads:
        return 0
    return sum(fin * fout * n for name, fin, fout, n in attention_linears(layer) if name in DSA_INDEXER_LINEARS) + \
        2 * layer.index_head_dim


def layer_linears(spec: ModelSpec, index: int) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of every linear of layer ``index``: its mixer's, then its MLP's."""
    spec = spec.layer(index)
    if spec.dsv4:  # DeepSeek-V4: attention, compressor, indexer, experts, shared expert (vramplan.dsv4)
        from .dsv4 import dsv4_linears

        return dsv4_linears(spec)
    if spec.dual_sublayers:  # LongCat-Flash: two attention/MLP pairs and the shortcut MoE (vramplan.longcat)
        from .longcat import longcat_linears

        return longcat_linears(spec)
    if spec.moe_beside_mlp or spec.per_layer_input:  # Gemma 4: the dense MLP, the MoE block beside it, the branch
        moe = index in spec.moe_layers
        return attention_linears(spec) + mlp_linears(spec, False) + (mlp_linears(spec, True) if moe else []) + \
            per_layer_input_linears(spec) + _altup_linears(spec)
    moe = index in spec.moe_layers
    mlp = [] if index in spec.mlp_free_layers else mlp_linears(spec, moe)
    if spec.mixer(index) in ("zamba_hybrid", "zamba_tied") and spec.ssm is not None:
        from .ssm import mamba1_linears, mamba2_linears

        mixer = mamba1_linears if spec.ssm.dt_rank else mamba2_linears
        return zamba2_block_linears(spec) + mixer(spec.ssm, spec.hidden_size)
    if spec.mixer(index) in ("mamba2", "parallel") and spec.ssm is not None:
        from .ssm import mamba2_linears

        attn = attention_linears(spec) if spec.mixer(index) == "parallel" else []
        return attn + mamba2_linears(spec.ssm, spec.hidden_size) + mlp
    if spec.mixer(index) == "conv":
        from .ssm import conv_linears

        return conv_linears(spec.hidden_size) + mlp
    if spec.mixer(index) == "mamba" and spec.ssm is not None:
        from .ssm import mamba1_linears

        return mamba1_linears(spec.ssm, spec.hidden_size) + mlp
    if spec.mixer(index) == "gdn" and spec.ssm is not None:
        from .gdn import gdn_linears

        return gdn_linears(spec.ssm, spec.hidden_size) + mlp
    if spec.mixer(index) == "rwkv":
        from .rwkv import rwkv_linears

        return rwkv_linears(spec)
    if spec.mixer(index) == "lightning":
        from .lightning import lightning_linears

        return lightning_linears(spec) + mlp
    if spec.mixer(index) == "rglru" and spec.ssm is not None:
        from .rglru import rglru_linears

        return rglru_linears(spec.ssm, spec.hidden_size) + mlp
    if spec.mixer(index) == "none":
        return mlp
    if spec.mixer(index) == "inkling":
        from .inkling import inkling_linears

        return inkling_linears(spec, index) + mlp
    return attention_linears(spec) + mlp


def zamba2_block_linears(spec: ModelSpec, *, shared: bool = True, own: bool = True) -> list[tuple[str, int, int, int]]:
    """The linears one Zamba2 hybrid layer runs (modeling_zamba2.py): ``shared``, those of the shared transformer
    block (q/k/v from 2 x hidden, o_proj, gate_up_proj, down_proj); ``own``, the layer's own ``linear`` and its
    adapters (gate_up_proj's, and q/k/v's with ``use_shared_attention_adapter``)."""
    sb = spec.shared_block
    assert sb is not None
    h, h2, r, i = spec.hidden_size, 2 * spec.hidden_size, sb.adapter_rank, sb.intermediate
    out: list[tuple[str, int, int, int]] = []
    if shared:
        out += [("q_proj", h2, spec.q_dim, 1), ("k_proj", h2, spec.kv_dim, 1), ("v_proj", h2, spec.kv_dim, 1),
                ("o_proj", spec.q_dim, h, 1)]
        out += [("gate_up_proj", h, 2 * i, 1)] if sb.fused_gate_up else [("gate_proj", h, i, 1), ("up_proj", h, i, 1)]
        out += [("down_proj", i, h, 1)]
    if own:
        out += [("linear", h, h, 1)]
        if r:
            out += [("gate_up_proj_adapter.0", h, r, 1), ("gate_up_proj_adapter.1", r, 2 * i, 1)]
        if sb.attention_adapters:
            out += [(f"linear_{x}_adapter.{j}", *((h2, r) if j == 0 else (r, h2)), 1) for x in "qkv" for j in (0, 1)]
    return out


def _zamba2_layer_params(spec: ModelSpec, index: int) -> LayerParams:
    """A Zamba2 hybrid layer: its Mamba-2 layer (mixer and input norm; Zamba's: Mamba-1), its own ``linear`` and
    adapters, and, for the first ``num_mem_blocks`` hybrid layers, the shared block they hold (its two norms over
    2 x hidden and hidden, attention and MLP); later hybrid layers reuse those weights (``zamba_tied``)."""
    from .ssm import mamba1_extra_params, mamba1_linears, mamba2_extra_params, mamba2_linears

    assert spec.ssm is not None and spec.shared_block is not None
    h = spec.hidden_size
    mamba1 = bool(spec.ssm.dt_rank)  # Zamba: a Mamba-1 layer
    owner = spec.mixer(index) == "zamba_hybrid"
    block: list[tuple[str, int, int, int]] = []
    if owner:  # the block's weights and the adapter sets it holds (one per hybrid index it serves)
        b = sum(1 for i in range(index) if spec.mixer(i) == "zamba_hybrid")
        sets = spec.shared_block.adapters_of_block(b)
        block = zamba2_block_linears(spec, own=False) + \
            [(n, i, o, c * sets) for n, i, o, c in zamba2_block_linears(spec, shared=False) if n != "linear"]
    mix = [*(mamba1_linears if mamba1 else mamba2_linears)(spec.ssm, h), ("linear", h, h, 1)]
    bias, other = (mamba1_extra_params if mamba1 else mamba2_extra_params)(spec.ssm, h)
    norms = _norm_params(spec, h)
    if owner:
        norms += _norm_params(spec, 2 * h) + _norm_params(spec, h)
        if spec.mlp_bias:
            bias += 2 * spec.shared_block.intermediate + h
    attn = [x for x in mix + block if x[0] in ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj")]
    rest = [x for x in mix + block if x not in attn]
    return LayerParams(sum(i * o * n for _, i, o, n in attn), sum(i * o * n for _, i, o, n in rest), bias,
                       norms + other, tuple(mix + block))


def _ssm_layer_params(spec: ModelSpec, index: int) -> LayerParams:
    """A Mamba-2 layer (modeling_mamba2.py Mamba2Mixer; Bamba/Granite-4/Nemotron-H copy it): in_proj, conv1d,
    dt_bias, A_log, D, the gated norm and out_proj, the block's norm(s), and the MLP where the layer has one."""
    from .gdn import gdn_extra_params, gdn_linears
    from .rglru import rglru_extra_params, rglru_linears
    from .ssm import (
        conv_extra_params,
        conv_linears,
        mamba1_extra_params,
        mamba1_linears,
        mamba2_extra_params,
        mamba2_linears,
    )

    assert spec.ssm is not None
    h = spec.hidden_size
    moe = index in spec.moe_layers
    kind = spec.mixer(index)
    mix = {"conv": conv_linears(h), "mamba": mamba1_linears(spec.ssm, h), "gdn": gdn_linears(spec.ssm, h),
           "rglru": rglru_linears(spec.ssm, h)}.get(kind) or mamba2_linears(spec.ssm, h)
    mlp = [] if index in spec.mlp_free_layers else mlp_linears(spec, moe)
    bias, other = {"conv": conv_extra_params, "mamba": mamba1_extra_params,
                   "gdn": gdn_extra_params, "rglru": rglru_extra_params}.get(kind, mamba2_extra_params)(spec.ssm, h)
    if mlp and spec.mlp_bias and not moe:
        bias += sum(o * n for _, _, o, n in mlp)
    if moe and spec.router_bias:
        bias += spec.num_experts
    if spec.mixer(index) == "parallel":  # Falcon-H1: attention beside the mixer
        attn = attention_linears(spec)
        mix = attn + mix
        if spec.qkv_bias:
            bias += sum(o for _, _, o, _ in attn[:-1])
        if spec.o_bias:
            bias += h
    norms = (1 if not mlp else spec.norms_per_layer) * _norm_params(spec, h)
    return LayerParams(sum(i * o * n for _, i, o, n in mix), sum(i * o * n for _, i, o, n in mlp), bias,
                       norms + other, tuple(mix + mlp))


def layer_params(spec: ModelSpec, index: int) -> LayerParams:
    spec = spec.layer(index)
    if spec.dsv4:
        from .dsv4 import dsv4_layer_params

        return dsv4_layer_params(spec)
    if spec.dual_sublayers:
        from .longcat import longcat_layer_params

        return longcat_layer_params(spec)
    if spec.moa:
        from .jetmoe import jetmoe_layer_params

        return jetmoe_layer_params(spec)
    if spec.zaya:
        from .zaya import zaya_layer_params

        return zaya_layer_params(spec, index)
    if spec.mixer(index) == "none":  # an MLP-only block (Nemotron-H "-"): its norm and MLP
        mlp = mlp_linears(spec, index in spec.moe_layers)
        bias = sum(o * n for _, _, o, n in mlp) if spec.mlp_bias else 0
        return LayerParams(0, sum(i * o * n for _, i, o, n in mlp), bias, _norm_params(spec, spec.hidden_size),
                           tuple(mlp))
    if spec.mixer(index) in ("zamba_hybrid", "zamba_tied"):
        return _zamba2_layer_params(spec, index)
    if spec.mixer(index) == "lightning":  # MiniMax: lightning attention, its norm, the MoE block, two norms
        from .lightning import lightning_extra_params, lightning_linears

        lin = lightning_linears(spec)
        mlp = mlp_linears(spec, index in spec.moe_layers)
        return LayerParams(sum(i * o for _, i, o, _ in lin), sum(i * o * n for _, i, o, n in mlp), 0,
                           spec.norms_per_layer * _norm_params(spec, spec.hidden_size) + lightning_extra_params(spec),
                           tuple(lin + mlp))
    if spec.mixer(index) == "rwkv":  # RwkvBlock: ln1, ln2, attention and feed-forward (block 0's pre_ln: embedding)
        from .rwkv import rwkv_extra_params, rwkv_linears

        lin = rwkv_linears(spec)
        return LayerParams(sum(i * o for _, i, o, _ in lin[:4]), sum(i * o for _, i, o, _ in lin[4:]), 0,
                           2 * _norm_params(spec, spec.hidden_size) + rwkv_extra_params(spec), tuple(lin))
    if spec.mixer(index) == "inkling":  # its attention's linears and MLP / MoE, two norms (the rest: extra_params)
        from .inkling import inkling_linears

        lin = inkling_linears(spec, index)
        mlp = mlp_linears(spec, index in spec.moe_layers)
        return LayerParams(sum(i * o for _, i, o, _ in lin), sum(i * o * n for _, i, o, n in mlp), 0,
                           2 * _norm_params(spec, spec.hidden_size), tuple(lin + mlp))
    if spec.mixer(index) != "attention":
        return _ssm_layer_params(spec, index)
    moe = index in spec.moe_layers
    attn = attention_linears(spec)
    mlp = [] if index in spec.mlp_free_layers else mlp_linears(spec, moe)
    if spec.moe_beside_mlp and moe:  # the dense MLP runs beside the MoE block (Gemma 4)
        mlp = mlp_linears(spec, False) + mlp
    mlp = mlp + per_layer_input_linears(spec) + _altup_linears(spec)
    attn_w = sum(i * o * n for _, i, o, n in attn)
    mlp_w = sum(i * o * n for _, i, o, n in mlp)
    bias = 0
    if spec.kv_lora_rank:  # attention_bias: q_a_proj (or nothing), kv_a_proj_with_mqa and o_proj
        if spec.qkv_bias:
            bias += spec.q_lora_rank + spec.kv_lora_rank + spec.qk_rope_head_dim + spec.hidden_size
    else:
        for name, _, o, n in attn[:-1]:
            bias += o * n if spec.qkv_bias and name != "g_proj" and not (spec.attn_gate and
                                                                          name == spec.attn_gate_name) else 0
        bias += spec.hidden_size if spec.o_bias else 0
    if spec.mlp_bias and not moe:
        bias += sum(o * n for _, _, o, n in mlp)
    if moe and spec.router_bias:
        bias += spec.num_experts
    if moe:
        bias += spec.moe_extra_params
    if moe and spec.shared_expert_bias:  # the shared expert's linears' biases (HY-V3 mlp_bias)
        bias += sum(o * n for name, _, o, n in mlp if name.startswith("shared_") and name != "shared_expert_gate")
    if moe and spec.expert_bias:  # gate_up_proj_bias and down_proj_bias of every expert
        bias += spec.num_experts * (2 * spec.moe_intermediate_size + spec.hidden_size)
    if spec.attention_sinks:
        bias += spec.num_heads
    if spec.dynamic_mask:  # DogeAttention.A (one per key-value head)
        bias += spec.num_kv_heads
    if spec.residual_weights:  # DogeDecoderLayer.input_residual and post_attention_residual
        bias += 2 * spec.hidden_size
    if spec.attn_gate and spec.attn_gate_bias:  # the gate's per-head bias (modeling_beam.py gate_bias)
        bias += spec.num_heads
    if spec.diff_attention:  # DiffLlamaAttention's lambda_q1, lambda_k1, lambda_q2, lambda_k2 (head_dim each)
        bias += 4 * spec.head_dim
    if spec.activation is Activation.XIELU and not moe:  # XIELUActivation's alpha_p and alpha_n, shape (1,) each
        bias += 2
    norm = (1 if index in spec.mlp_free_layers else spec.norms_per_layer - (0 if spec.attn_norm else 1)) * \
        _norm_params(spec, spec.hidden_size)
    norm += spec.q_lora_rank + spec.kv_lora_rank  # MLA's q_a_layernorm and kv_a_layernorm
    if spec.mla_latent_scale:  # Dots 3's k_rope_only_layernorm
        norm += spec.qk_rope_head_dim
    if spec.index_heads:
        norm += 2 * spec.index_head_dim  # the indexer's k_norm: nn.LayerNorm with a bias
    if spec.qk_norm:
        # (LayerNorms with a bias count it: Phi's q_layernorm / k_layernorm)
        norm += spec.q_dim + spec.kv_dim if spec.qk_norm_head_weights else \
            _norm_params(spec, spec.q_dim) + _norm_params(spec, spec.kv_dim) if spec.qk_norm_full else \
            (1 if spec.kv_shared else 2) * _norm_params(spec, spec.head_dim)  # a sharing layer has no k_norm
    if spec.moe_beside_mlp and moe:  # post_feedforward_layernorm_1 / _2, pre_feedforward_layernorm_2
        norm += 3 * _norm_params(spec, spec.hidden_size)
    if spec.moe_post_norm and moe:  # the MoE block's own output norm (AXK1MoE.post_mlp_layernorm)
        norm += _norm_params(spec, spec.hidden_size)
    if spec.per_layer_input:  # post_per_layer_input_norm
        norm += _norm_params(spec, spec.hidden_size)
    if spec.altup_inputs:  # Gemma 3n: correct_output_scale, router_norm, post_laurel_norm
        from .gemma3n import altup_extra_params

        norm += altup_extra_params(spec.hidden_size)
    if spec.sub_norms:  # BitNet's attn_sub_norm (hidden) and ffn_sub_norm (intermediate)
        norm += spec.hidden_size + spec.intermediate_size
    if spec.hc_mult:  # the layer's two hyper-connection modules (vramplan.hyper)
        from .hyper import hc_layer_params

        norm += hc_layer_params(spec)
    return LayerParams(attn_w, mlp_w, bias, norm, tuple(attn + mlp))


@lru_cache(maxsize=1024)
def count_params(spec: ModelSpec) -> ParamCounts:
    h, v = spec.hidden_size, spec.vocab_size
    d_embed = spec.embed_proj_dim or h
    embedding = v * d_embed + spec.max_learned_positions * h + spec.extra_params
    if spec.embedding_layernorm:
        embedding += _norm_params(spec, h)
    if spec.embed_proj_dim:
        embedding += 2 * h * spec.embed_proj_dim  # OPT project_in / project_out (no bias)
    if spec.per_layer_input:  # embed_tokens_per_layer, per_layer_model_projection, per_layer_projection_norm
        width = spec.num_layers * spec.per_layer_input
        embedding += spec.per_layer_vocab * width + h * width + _norm_params(spec, spec.per_layer_input)
    if spec.altup_inputs:  # Gemma 3n: altup_projections and altup_unembed_projections (A - 1 each, no bias)
        embedding += 2 * (spec.altup_inputs - 1) * h * h
    from .inkling2 import loop_range

    loop_first, loop_end = loop_range(spec)[:2]
    unique: dict[tuple[bool, str, bool, int, int], LayerParams] = {}
    layers = []
    for i in range(spec.num_layers):
        # a Zamba2 block owner's adapter sets depend on which block it holds
        # (and an Inkling-2-Loop loop layer has its message gates)
        # (and ZAYA's layers after the first scale the router state they receive)
        key = (i in spec.moe_layers, spec.mixer(i), i in spec.mlp_free_layers,
               i if spec.mixer(i) == "zamba_hybrid" else -2 if loop_first <= i < loop_end else
               -3 if spec.zaya and i > 0 else -1, spec.variant(i))
        if key not in unique:
            unique[key] = layer_params(spec, i)
        layers.append(unique[key])
    final_norm = _norm_params(spec, h) if spec.final_norm else 0
    if spec.hc_mult:  # the HC head collapsing the hyper-connection copies before the final norm
        from .hyper import hc_head_params

        final_norm += hc_head_params(spec)
    lm_head = 0 if spec.tie_word_embeddings else v * d_embed
    if spec.lm_head_bias:
        lm_head += v
    if spec.head_transform:  # ModernBERT's prediction head: dense (+ bias) and a norm before the output projection
        lm_head += h * h + (h if spec.head_transform_bias else 0) + _norm_params(spec, h)
    return ParamCounts(embedding, tuple(layers), final_norm, lm_head)
