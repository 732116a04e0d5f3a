"""DeepSeek-V4 (modeling_deepseek_v4.py, transformers 5.24: DeepseekV4ForCausalLM): the reader, the layer's parameters
and its memory program.

A decoder layer (``DeepseekV4DecoderLayer``) keeps the residual as ``hc_mult`` copies, (batch, seq, hc_mult, hidden),
and runs two sublayers, each between a manifold-constrained hyper-connection (``DeepseekV4HyperConnection``, fp32
parameters) and its mix back into the copies::

    post, comb, collapsed = attn_hc(x)          # pre/post weights and a Sinkhorn-normalised comb (hc_mult x hc_mult)
    x = post.to(dtype) * attn(norm(collapsed)) + comb.to(dtype)^T @ x
    post, comb, collapsed = ffn_hc(x)
    x = post.to(dtype) * moe(norm(collapsed)) + comb.to(dtype)^T @ x

The hyper-connection reads the flattened copies in fp32, RMS-normalises them (``DeepseekV4UnweightedRMSNorm``),
``F.linear`` with its fp32 ``fn`` to (2 + hc_mult) x hc_mult mixes per token: ``pre`` and ``post`` through sigmoids,
``comb`` through a softmax, then ``hc_sinkhorn_iters`` Sinkhorn-Knopp steps, each ``comb / (comb.sum(dim) + eps)``
(the first over columns only, then rows and columns): every division saves its numerator and denominator for backward,
(2 x iters - 1) fp32 copies of the (tokens, hc_mult, hc_mult) matrix. ``collapsed`` is ``sum(pre * x)``: an fp32
product of the whole stream, summed and cast back.

The attention (``DeepseekV4Attention``) is shared-KV multi-query attention: ``q_a_proj``, the fp32-weight ``q_a_norm``,
``q_b_proj`` to every head at ``head_dim`` (512), a weightless RMSNorm of each head, interleaved partial RoPE on the
last ``qk_rope_head_dim`` channels (fp32, then ``cat`` with the rest); one key ``kv_proj`` -> ``kv_norm`` -> RoPE that
is also the value. Layers with a compressor append compressed entries to the keys: the HCA compressor
(``DeepseekV4HCACompressor``) softmax-pools every ``compress_rate`` tokens (``kv_proj``, ``gate_proj``, an fp32
position bias, the gate's fp32 softmax), the CSA one (``DeepseekV4CSACompressor``) pools overlapping windows of twice
that from a (windows, 2 x rate, head_dim) re-layout and runs the Lightning Indexer (``DeepseekV4Indexer``: its own
compressor at ``index_head_dim``, ``q_b_proj`` of the q latent, fp32 scores of every query head against every
compressed entry, ReLU, weighted by ``weights_proj``, top-k) whose indices build the per-query bias over the compressed
entries. Its output is integer indices: autograd records its graph but nothing reaches it from the loss, so its
tensors die when it returns and its parameters get no gradient. Eager attention (the model has no SDPA path):
``repeat_kv`` copies the single key/value head to every head twice (once as keys, once as values), scores
``q @ k^T * scale + mask`` in bf16, ``cat`` with the fp32 per-head sinks (fp32 from there), minus the row max, fp32
softmax, the sink column sliced off and cast back, times v. The output's rope channels are rotated back (``-sin``),
heads regrouped (``reshape`` of a transposed tensor: a copy) into ``o_groups`` groups, the block-diagonal
``o_a_proj`` (``DeepseekV4GroupedLinear``: a ``bmm`` per group, the result reshaped: another copy) and ``o_b_proj``.

The MoE block (``DeepseekV4SparseMoeBlock``): a router whose ``sqrtsoftplus`` scores pick the top-k experts
(``DeepseekV4TopKRouter``, plus the fp32 correction bias) or read them from the frozen token-id table
(``DeepseekV4HashRouter``, the first ``mlp_layer_types`` "hash_moe" layers), the routed experts as transformers'
grouped_mm experts with the clamped SwiGLU (``DeepseekV4Experts._apply_gate``), and an always-on shared expert
(``DeepseekV4MLP``: clamped gate and up).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._engine.ops import rms_normalize
from .errors import ConfigError
from .kinds import MemoryKind
from .spec import LayerOverride, ModelSpec, NormKind

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ._engine.tape import Tensor
    from .blocks import _B
    from .hfconfig import _Cfg
    from .params import LayerParams

__all__ = ["DSV4_CLASSES", "DSV4_READERS", "dsv4_decode", "dsv4_fp8_bytes", "dsv4_head", "dsv4_idle_adapters",
           "dsv4_layer", "dsv4_layer_params", "dsv4_linear_names", "dsv4_linears"]

# configuration_deepseek_v4.py DeepseekV4Config's defaults (transformers 5.24)
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024, "num_experts_per_tok": 6,
    "n_routed_experts": 256, "scoring_func": "sqrtsoftplus", "max_position_embeddings": 1048576, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hidden_act": "silu", "tie_word_embeddings": False}
_CSA, _HCA, _SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
_RATIO_TYPES = {0: _SLIDING, 4: _CSA, 128: _HCA}  # DeepseekV4Config's legacy compress_ratios
_SCORES = ("sqrtsoftplus", "softmax", "sigmoid")


def _kinds(c: _Cfg, raw: Mapping[str, Any], layers: int) -> tuple[list[str], list[str]]:
    """DeepseekV4Config.__post_init__: the attention type and the MLP type of every layer."""
    types = raw.get("layer_types")
    legacy = raw.get("compress_ratios")
    if types is None and isinstance(legacy, list):
        if any(not isinstance(r, int) or isinstance(r, bool) or r not in _RATIO_TYPES for r in legacy):
            raise ConfigError(f"{c.where}: compress_ratios entries must be 0, 4 or 128")
        types = [_RATIO_TYPES[r] for r in legacy]
    if types is None:  # V4-Pro default: two HCA layers, then CSA / HCA interleaved
        types = [_HCA] * min(layers, 2) + [_CSA if i % 2 else _HCA for i in range(max(layers - 2, 0))]
    mlp = raw.get("mlp_layer_types")
    if mlp is None:
        n_hash = c.int_("num_hash_layers", default=3, lo=0, hi=1 << 20)
        mlp = ["hash_moe"] * min(layers, n_hash) + ["moe"] * max(0, layers - n_hash)
    for name, v, allowed in (("layer_types", types, (_SLIDING, _CSA, _HCA)), ("mlp_layer_types", mlp,
                                                                              ("hash_moe", "moe"))):
        if not isinstance(v, list) or len(v) < layers or any(t not in allowed for t in v[:layers]):
            raise ConfigError(f"{c.where}: {name} must list one of {', '.join(allowed)} for each of the {layers} "
                              "layers")
    return [str(t) for t in types[:layers]], [str(t) for t in mlp[:layers]]


def _deepseek_v4(c: _Cfg, family: str) -> ModelSpec:
    from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like
    from .params import count_params

    cc = c.with_defaults(_DEFAULTS)
    raw = cc.raw
    layers = cc.int_("num_hidden_layers", hi=_MAX_LAYERS)
    types, mlp = _kinds(cc, raw, layers)
    rates = raw.get("compress_rates") or {}
    if not isinstance(rates, dict):
        raise ConfigError(f"{c.where}: compress_rates must be a mapping of layer type to rate")
    # the legacy scalar keys override the mapping (DeepseekV4Config.__post_init__)
    given = _Cfg({"compress_rate_csa": raw.get("compress_rate_csa") or rates.get(_CSA, 4),
                  "compress_rate_hca": raw.get("compress_rate_hca") or rates.get(_HCA, 128)}, c.where)
    csa, hca = given.int_("compress_rate_csa", hi=1 << 20), given.int_("compress_rate_hca", hi=1 << 20)
    heads, head_dim = cc.int_("num_attention_heads"), cc.int_("head_dim")
    # partial_rotary_factor, else the legacy qk_rope_head_dim / head_dim, else the class default 64 / 512
    prf = raw.get("partial_rotary_factor")
    if prf is None and raw.get("qk_rope_head_dim") is not None:
        rope_dim = cc.int_("qk_rope_head_dim")
    else:
        rope_dim = int(head_dim * (cc.float_("partial_rotary_factor", hi=1.0) if prf is not None else 64 / 512))
    if rope_dim % 2 or not 0 < rope_dim <= head_dim:
        raise ConfigError(f"{c.where}: the rotary part ({rope_dim} channels) must be even and within head_dim")
    groups, o_rank = cc.int_("o_groups"), cc.int_("o_lora_rank")
    if (heads * head_dim) % groups:
        raise ConfigError(f"{c.where}: o_groups ({groups}) must divide num_attention_heads x head_dim")
    score = raw.get("scoring_func")
    if score not in _SCORES:
        raise ConfigError(f"{c.where}: scoring_func must be one of {', '.join(_SCORES)}")
    experts, top_k = cc.int_("n_routed_experts"), cc.int_("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(f"{c.where}: num_experts_per_tok ({top_k}) exceeds n_routed_experts ({experts})")
    inter = cc.int_("moe_intermediate_size")
    index = (cc.int_("index_n_heads"), cc.int_("index_head_dim"), cc.int_("index_topk"))
    # DeepseekV4Config.__post_init__ moves a top-level expert_dtype into the quantization_config; FineGrainedFP8Config
    # takes "fp8" (default) or "fp4" (two e2m1 values per byte), and scale_fmt "ue8m0" (1-byte scales) or "float"
    qc_raw = raw.get("quantization_config")
    qc: dict[str, Any] = qc_raw if isinstance(qc_raw, dict) else {}
    expert_dtype = qc.get("expert_dtype", raw.get("expert_dtype", "fp8"))
    if expert_dtype not in ("fp8", "fp4"):
        raise ConfigError(f"{c.where}: expert_dtype must be 'fp8' or 'fp4' (FineGrainedFP8Config)")
    fp8 = (int(expert_dtype == "fp4"), int(qc.get("scale_fmt") == "ue8m0"))
    hc = cc.int_("hc_mult")
    iters = cc.int_("hc_sinkhorn_iters")
    base = {k: v for k, v in raw.items() if k not in ("layer_types", "mlp_layer_types", "rope_parameters",
                                                       "rope_scaling", "sliding_window", "partial_rotary_factor")}
    base |= {"num_key_value_heads": 1, "intermediate_size": inter}
    facts = _Facts(version="5.24", norm=NormKind.FP32_WEIGHT_RMSNORM, sinks=True)
    spec = _llama_like(_Cfg(base, c.where), family, facts)
    kinds: dict[tuple[int, bool], list[int]] = {}
    for i in range(layers):
        rate = {_SLIDING: 0, _CSA: csa, _HCA: hca}[types[i]]
        kinds.setdefault((rate, mlp[i] == "hash_moe"), []).append(i)
    overrides = tuple(LayerOverride(layers=tuple(ix), compress_rate=rate, hash_routed=hashed)
                      for (rate, hashed), ix in kinds.items())
    h, vocab = spec.hidden_size, spec.vocab_size
    spec = replace(spec, q_lora_rank=cc.int_("q_lora_rank"), num_experts=experts, experts_per_token=top_k,
                   moe_intermediate_size=inter,
                   shared_expert_intermediate_size=inter, moe_layers=tuple(range(layers)), expert_glu="clamped_silu",
                   hc_mult=hc, sinks_fp32=True, rotary_fraction=rope_dim / head_dim,
                   sliding_window=cc.int_("sliding_window"), layer_overrides=overrides,
                   dsv4=(groups, o_rank, iters, csa, hca, rope_dim, *index, _SCORES.index(str(score)), *fp8),
                   program_version="5.24")
    n_hash = sum(1 for t in mlp if t == "hash_moe")
    # buffers moved to the GPU with the parameters: the hash layers' tid2eid (vocab x top-k int64), the top-k routers'
    # fp32 e_score_correction_bias, and every DeepseekV4RotaryEmbedding's (the model's, each compressor's and
    # indexer's) inv_freq and original_inv_freq for its two rope types: 4 x rope_dim / 2 fp32
    rotaries = 1 + sum(1 for t in types if t != _SLIDING) + sum(1 for t in types if t == _CSA)
    buffers = n_hash * vocab * top_k * 8 + (layers - n_hash) * experts * 4 + rotaries * 4 * (rope_dim // 2) * 4
    # _keep_in_fp32_modules_strict (DeepseekV4PreTrainedModel): attn_hc, ffn_hc, hc_head, sinks, position_bias,
    # q_a_norm, kv_norm, input_layernorm, post_attention_layernorm, norm (the compressors' and indexers' too)
    fp32 = h + (hc * hc * h + hc + 1)
    idle = 0
    for i in range(layers):
        s = spec.layer(i)
        fp32 += 2 * _hc_params(s) + heads + spec.q_lora_rank + head_dim + 2 * h + _compressor_fp32(s)
        idle += _indexer_params(s)
    spec = replace(spec, fp32_params=fp32, buffer_bytes=buffers, idle_params=idle)
    count_params(spec)  # reads every layer's spec: fails here, not in the estimate, on an unreadable one
    return spec


DSV4_READERS: dict[str, Callable[[_Cfg, str], ModelSpec]] = {"deepseek_v4": _deepseek_v4}
DSV4_CLASSES: dict[str, str] = {"DeepseekV4ForCausalLM": "deepseek_v4"}


# ---- parameters ---------------------------------------------------------------------------------------------------

def _hc_params(spec: ModelSpec) -> int:
    """One DeepseekV4HyperConnection: ``fn`` ((2 + n) x n, n x hidden), ``base`` ((2 + n) x n), ``scale`` (3)."""
    n = spec.hc_mult
    m = (2 + n) * n
    return m * n * spec.hidden_size + m + 3


def _indexer_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """The CSA layer's Lightning Indexer (DeepseekV4Indexer): kv_proj, gate_proj (2 x index_head_dim), q_b_proj of the
    q latent, the scorer's weights_proj; none elsewhere."""
    if spec.compress_rate != spec.dsv4[3]:
        return []
    h, hi, di = spec.hidden_size, spec.dsv4[6], spec.dsv4[7]
    return [("kv_proj", h, 2 * di, 1), ("gate_proj", h, 2 * di, 1), ("q_b_proj", spec.q_lora_rank, hi * di, 1),
            ("weights_proj", h, hi, 1)]


def _indexer_params(spec: ModelSpec) -> int:
    """The indexer's parameters (linears, position_bias, kv_norm): no gradient ever reaches them."""
    lin = _indexer_linears(spec)
    if not lin:
        return 0
    di = spec.dsv4[7]
    return sum(a * b for _, a, b, _ in lin) + spec.compress_rate * 2 * di + di


def _compressor_fp32(spec: ModelSpec) -> int:
    """The compressor's (and indexer's) fp32 parameters: position_bias and kv_norm."""
    rate = spec.compress_rate
    if not rate:
        return 0
    d = spec.head_dim
    width = 2 * d if rate == spec.dsv4[3] else d
    out = rate * width + d
    if rate == spec.dsv4[3]:
        di = spec.dsv4[7]
        out += rate * 2 * di + di
    return out


def dsv4_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of one layer's weights, named by the leaf names peft matches: the attention's,
    its compressor's (CSA: twice the head width) and indexer's, the experts and router, the shared expert."""
    h, d, qr = spec.hidden_size, spec.head_dim, spec.q_lora_rank
    g, olr = spec.dsv4[0], spec.dsv4[1]
    hd = spec.num_heads * d
    out = [("q_a_proj", h, qr, 1), ("q_b_proj", qr, hd, 1), ("kv_proj", h, d, 1), ("o_a_proj", hd // g, g * olr, 1),
           ("o_b_proj", g * olr, h, 1)]
    if spec.compress_rate:
        width = 2 * d if spec.compress_rate == spec.dsv4[3] else d
        out += [("kv_proj", h, width, 1), ("gate_proj", h, width, 1)]
    out += _indexer_linears(spec)
    i, e = spec.moe_intermediate_size, spec.num_experts
    return [*out, ("experts.gate_proj", h, i, e), ("experts.up_proj", h, i, e), ("experts.down_proj", i, h, e),
            ("router", h, e, 1), ("gate_proj", h, i, 1), ("up_proj", h, i, 1), ("down_proj", i, h, 1)]


def dsv4_layer_params(spec: ModelSpec) -> LayerParams:
    """One DeepseekV4DecoderLayer: its linears, the sinks, q_a_norm and kv_norm, the compressor's position bias and
    kv_norm (and the indexer's), the two layer norms and the two hyper-connections."""
    from .params import LayerParams

    lin = dsv4_linears(spec)
    split = len(lin) - 7
    attn, mlp = lin[:split], lin[split:]
    d = spec.head_dim
    other = spec.num_heads + spec.q_lora_rank + d + 2 * spec.hidden_size + 2 * _hc_params(spec) + \
        _compressor_fp32(spec)
    return LayerParams(sum(a * b * k for _, a, b, k in attn), sum(a * b * k for _, a, b, k in mlp), 0, other,
                       tuple(lin))


def dsv4_idle_adapters(spec: ModelSpec, targets: frozenset[str], rank: int, dora: bool) -> int:
    """Adapter parameters peft puts on the indexers' linears (their leaf names are targets): no gradient reaches
    them."""
    return sum(rank * (fin + fout) * n + (fout * n if dora else 0) for i in range(spec.num_layers)
               for name, fin, fout, n in _indexer_linears(spec.layer(i)) if name in targets)


def dsv4_linear_names(spec: ModelSpec) -> frozenset[str]:
    """The nn.Linear leaf names peft's all-linear adapts (the experts and the router are parameters)."""
    return frozenset(n for i in range(spec.num_layers) for n, *_ in dsv4_linears(spec.layer(i))
                     if not n.startswith("experts.") and n != "router")


def dsv4_fp8_bytes(spec: ModelSpec, block: tuple[int, int]) -> tuple[int, int, int]:
    """(weight bytes, scale bytes, weights they hold) of a fine-grained FP8 checkpoint (DeepSeek-V4-Flash's
    quantization_config) as transformers 5.24 allocates it (integrations/finegrained_fp8.py): every module whose type
    is nn.Linear becomes an FP8Linear (fp8 weight, one scale per ``block`` tile) and DeepseekV4GroupedLinear an
    FP8GroupedLinear (the same layout); the experts an FP8Experts stack, FP4-packed where ``expert_dtype`` is "fp4"
    (int8 holding two values, K halved, one scale per 32 inputs of each row) or fp8 with block scales; the modules
    in ``_keep_in_fp32_modules`` (the compressors' and indexers' kv_proj / gate_proj, the scorer's weights_proj), the
    routers (not nn.Linear) and the lm_head stay 16-bit. Scales are 1 byte with scale_fmt "ue8m0", else fp32."""
    bn, bk = block
    fp4, sfb = spec.dsv4[10], 1 if spec.dsv4[11] else 4

    def tiles(n: int, k: int, gn: int, gk: int) -> int:
        return -(-n // gn) * -(-k // gk)

    w = c = numel = 0
    for i in range(spec.num_layers):
        s = spec.layer(i)
        lin = dsv4_linears(s)
        keep = {j for j, (name, *_) in enumerate(lin) if name in ("gate_proj", "kv_proj", "weights_proj")
                and 5 <= j < len(lin) - 7}  # the compressor's and indexer's projections
        for j, (name, fin, fout, n) in enumerate(lin):
            if name == "router" or j in keep:
                continue
            numel += fin * fout * n
            if name.startswith("experts."):
                continue
            w += fin * fout
            c += tiles(fout, fin, bn, bk) * sfb
        e, h, inter = s.num_experts, s.hidden_size, s.moe_intermediate_size
        for out, k, min_out in ((2 * inter, h, 2), (h, inter, 1)):  # gate_up_proj, down_proj
            if fp4:
                w += e * out * (k // 2)
                c += e * max(out, min_out) * -(-k // 32) * sfb
            else:
                w += e * out * k
                c += e * max(-(-out // bn), min_out) * -(-k // bk) * sfb
    return w, c, numel


# ---- memory program -----------------------------------------------------------------------------------------------

_KV = tuple(MemoryKind).index(MemoryKind.KV_CACHE)


def _cached(bld: _B, *tensors: Tensor) -> None:
    """Tensors the layer's cache (DeepseekV4HCACache / DeepseekV4CSACache) holds after a prefill: the sliding keys'
    ``cat`` (the window kept is a view of it), the compressor's and indexer's ``kv_proj`` / ``gate_proj`` outputs (the
    leftover buffer is a view of them), their compressed entries and the CSA overlap slices' clones."""
    if bld.num.training:
        return
    for t in tensors:
        (t.base or t).kind = _KV
    bld.tp.keep(*tensors)


def _lin(bld: _B, x: Tensor, fin: int, fout: int, name: str, leaf: str, *, trainable: bool | None = None) -> Tensor:
    """An nn.Linear of the layer (bf16 weight), with peft's adapter where its leaf name is a target."""
    plan = bld.plan
    assert plan is not None
    tr = plan.trainable if trainable is None else trainable
    return bld.linear(x, fin, fout, name, bias=False, trainable=tr, quant=plan.quant,
                      lora_rank=plan.lora_rank if leaf in plan.lora_targets else 0)


def _norm32(bld: _B, x: Tensor, dim: int, name: str, trainable: bool) -> Tensor:
    """DeepseekV4RMSNorm with its fp32 weight: the fp32 normalised states times the weight, in fp32, cast back."""
    tp = bld.tp
    n32 = rms_normalize(tp, x, dim)
    pg = bld.param_grad(name, dim, 4) if trainable else ()
    out = tp.op(n32.numel, 4, (n32,), save=(n32,) if trainable else (), params=pg, rg=n32.rg or trainable)
    return bld.cast(out, x.elem)


def _unweighted_norm(bld: _B, x: Tensor, dim: int) -> Tensor:
    """DeepseekV4UnweightedRMSNorm: ``x * rsqrt(x.float().square().mean(-1) + eps).to(x.dtype)``."""
    tp = bld.tp
    x32 = bld.cast(x, 4)
    sq = tp.op(x.numel, 4, (x32,), save=(x32,) if x32.rg else (), bwd_scratch=2 * x.numel * 4)
    var = tp.op(x.numel // dim, 4, (sq,))
    rs = bld.ew(var, save_out=True)
    return tp.mul(x, bld.cast(rs, x.elem))


def _rope(bld: _B, x: Tensor, dim: int) -> Tensor:
    """apply_rotary_pos_emb (V4's interleaved RoPE on the last ``qk_rope_head_dim`` channels of each ``dim``-wide
    head): ``rope.float() * cos + rotate_half(rope).float() * sin`` (``stack((-x2, x1))``), cast back, ``cat`` with
    the pass-through channels."""
    tp = bld.tp
    rd = bld.spec.dsv4[5]
    r = x.numel // dim * rd
    part = tp.view(x, r)
    a = tp.op(r, 4, (bld.cast(part, 4),))  # rope.float() * cos
    neg = tp.op(r // 2, x.elem, (part,))  # -x2
    st = tp.op(r, x.elem, (neg, part))  # stack((-x2, x1), -1).flatten(-2)
    b = tp.op(r, 4, (bld.cast(st, 4),))  # .float() * sin
    rot = bld.cast(bld.add(a, b), x.elem)
    return tp.op(x.numel, x.elem, (x, rot))  # cat([nope, rotated], -1)


def _hyper(bld: _B, x: Tensor, name: str, trainable: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DeepseekV4HyperConnection.forward on the streams ``x``: (post, comb, collapsed)."""
    tp, spec = bld.tp, bld.spec
    n, h, iters = spec.hc_mult, spec.hidden_size, spec.dsv4[2]
    t = x.numel // (n * h)
    m = (2 + n) * n
    normed = rms_normalize(tp, x, n * h)  # view(b, s, -1).float(), input_norm
    pg = bld.param_grad(name + ".fn", m * n * h, 4) if trainable else ()
    mixes = tp.op(t * m, 4, (normed,), save=(normed,) if trainable else (), params=pg)  # F.linear(., fn.float())
    if normed.rg:
        tp.ops[-1].packs_weight = True
    scale = bld.param_grad(name + ".scale", 3, 4) if trainable else ()
    bias = bld.param_grad(name + ".base", m, 4) if trainable else ()

    def logits(w: Tensor) -> Tensor:  # w * scale + base (the scale's gradient reads w)
        z = tp.op(w.numel, 4, (w,), save=(w,) if trainable else (), params=scale, rg=w.rg or trainable)
        return tp.op(w.numel, 4, (z,), params=bias, rg=z.rg or trainable)

    pre_w, post_w, comb_w = tp.view(mixes, t * n), tp.view(mixes, t * n), tp.view(mixes, t * n * n)
    pre = tp.op(t * n, 4, (bld.ew(logits(pre_w), save_out=True),))  # sigmoid(.) + eps
    post = tp.op(t * n, 4, (bld.ew(logits(post_w), save_out=True),))  # 2 * sigmoid(.)
    comb = tp.op(t * n * n, 4, (bld.ew(logits(comb_w), save_out=True),))  # softmax(., -1) + eps
    for _ in range(2 * iters - 1):  # comb / (comb.sum(dim, keepdim=True) + eps): saves both operands
        den = tp.op(t * n, 4, (tp.op(t * n, 4, (comb,)),))
        comb = tp.mul(comb, den)
    # (pre.unsqueeze(-1) * hidden_streams).sum(dim=2).to(dtype): an fp32 stream-sized product
    prod = tp.op(t * n * h, 4, (pre, x), save=((x,) if pre.rg else ()) + ((pre,) if x.rg else ()),
                 bwd_scratch=t * n * h * 4 if pre.rg else 0)
    s = tp.op(t * h, 4, (prod,))
    return post, comb, bld.cast(s, x.elem)


def _mix(bld: _B, post: Tensor, out: Tensor, comb: Tensor, x: Tensor) -> Tensor:
    """``post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + matmul(comb.to(dtype).transpose(-1, -2), x)``."""
    tp = bld.tp
    big = x.numel
    pb = bld.cast(post, x.elem)
    rg = [v for v in (pb, out) if v.rg]
    m = tp.op(big, x.elem, (pb, out), save=((out,) if pb.rg else ()) + ((pb,) if out.rg else ()),
              bwd_scratch=sum(big * x.elem - v.numel * v.elem for v in rg))
    cb = bld.cast(comb, x.elem)
    mm = tp.op(big, x.elem, (cb, x), save=((x,) if cb.rg else ()) + ((cb,) if x.rg else ()))
    return bld.add(m, mm)


def _pool(bld: _B, kv: Tensor, gate: Tensor, windows: int, width: int, overlap: bool, name: str,
          trainable: bool) -> Tensor:
    """A compressor's pooling of ``windows`` windows (DeepseekV4HCACompressor / DeepseekV4CSACompressor /
    DeepseekV4Indexer): the gate plus the fp32 position bias (fp32), the CSA re-layout into (windows, 2 x rate, width)
    zeros / -inf buffers (``new_zeros``, ``new_full``, slices copied in), the gate's fp32 softmax over the window cast
    back, times the values, summed over the window, kv_norm, RoPE. Returns (batch, windows, width)."""
    tp = bld.tp
    rate = bld.spec.compress_rate
    numel = windows * rate * (2 if overlap else 1) * width * bld.b
    g = tp.op(numel, 4, (gate,), params=bld.param_grad(name + ".position_bias", numel // (windows * bld.b), 4)
              if trainable else (), rg=gate.rg or trainable)
    if overlap:  # new_kv / new_gate filled from the two halves of the projections (CopySlices)
        kv = tp.op(numel, kv.elem, (kv,))
        g = tp.op(numel, 4, (g,))
    if overlap:  # the cache's overlap state: chunk[:, -1, :, :width].clone() of the values and the gate
        _cached(bld, tp.op(bld.b * rate * width, kv.elem, (kv,), rg=False), tp.op(bld.b * rate * width, 4, (g,),
                                                                                   rg=False))
    sm = bld.ew(g, save_out=True)  # softmax(dim=2, dtype=float32)
    w = bld.cast(sm, kv.elem)
    pooled = tp.op(bld.b * windows * width, kv.elem, (tp.mul(kv, w),))  # (kv * w).sum(dim=2)
    out = _rope(bld, _norm32(bld, pooled, width, name + ".kv_norm", trainable), width)
    _cached(bld, out)
    return out


def _indexer(bld: _B, n: Tensor, q_res: Tensor, windows: int) -> None:
    """DeepseekV4Indexer.forward: recorded by autograd but unreachable from the loss (its result is the top-k
    indices), so nothing it makes outlives it and its parameters get no gradient; its largest tensors are the fp32
    scores of every index head against every compressed entry, and the keys ``matmul`` broadcasts to every query
    position first, (batch, seq, index_head_dim, entries) fp32."""
    tp, spec = bld.tp, bld.spec
    h, hi, di, topk = spec.hidden_size, spec.dsv4[6], spec.dsv4[7], spec.dsv4[8]
    t = bld.t
    # the indexer's graph is dropped with its locals: recorded here on inputs that need no gradient; what adapters
    # on its linears would save is dropped below
    n, q_res = tp.view(n), tp.view(q_res)
    n.rg = q_res.rg = False
    start = len(tp.ops)
    kv = _lin(bld, n, h, 2 * di, "indexer.kv_proj", "kv_proj", trainable=False)
    gate = _lin(bld, n, h, 2 * di, "indexer.gate_proj", "gate_proj", trainable=False)
    _cached(bld, kv, gate)
    comp = _pool(bld, kv, gate, windows, di, True, "indexer", False) if windows else None
    q = _rope(bld, _lin(bld, q_res, spec.q_lora_rank, hi * di, "indexer.q_b_proj", "q_b_proj", trainable=False), di)
    wp = _lin(bld, n, h, hi, "indexer.weights_proj", "weights_proj", trainable=False)
    for i, op in enumerate(tp.ops[start:], start):  # (peft's adapters: their outputs need a gradient)
        for v in op.saved:
            v.saved_by.remove(i)
        op.saved, op.params, op.grad_inputs, op.bwd_scratch = (), (), (), 0
        for v in op.outputs:
            v.rg = False
    if comp is None:
        return
    sc = t * hi * windows
    q32, k32 = bld.cast(q, 4), bld.cast(comp, 4)
    scores = tp.op(sc, 4, (q32, k32), fwd_scratch=t * di * windows * 4)  # matmul(q.float(), k.float()^T)
    scores = tp.op(sc, 4, (tp.op(sc, 4, (scores,)),))  # relu, * softmax_scale
    wf = tp.op(t * hi, 4, (bld.cast(wp, 4),))  # weights.float() * weights_scaling
    idx = tp.op(t * windows, 4, (tp.op(sc, 4, (scores, wf)),))  # (scores * weights.unsqueeze(-1)).sum(dim=2)
    k = min(topk, windows)
    idx = tp.op(t * windows, 4, (idx,))  # masked_fill(future_mask, -inf)
    tp.op(t * k, 4, (idx,))  # topk values
    top = tp.op(t * k, 8, (idx,))
    out = tp.op(t * k, 8, (top, tp.op(t * k, 1, (top,)), tp.op(t * k, 8, (top,))))  # where(invalid, -1, top)
    tp.hold(kv, gate, comp, q, q32, k32, wp, out)  # the forward's locals


def _attention(bld: _B, n: Tensor) -> Tensor:
    """DeepseekV4Attention.forward (training; inference: the prefill, filling the cache)."""
    tp, spec, plan = bld.tp, bld.spec, bld.plan
    assert plan is not None
    tr = plan.trainable
    h, d, heads, qr = spec.hidden_size, spec.head_dim, spec.num_heads, spec.q_lora_rank
    g, olr = spec.dsv4[0], spec.dsv4[1]
    b, s = bld.b, bld.s
    t = b * s
    q_res = _norm32(bld, _lin(bld, n, h, qr, "q_a_proj", "q_a_proj"), qr, "q_a_norm", tr)
    q = _rope(bld, _unweighted_norm(bld, _lin(bld, q_res, qr, heads * d, "q_b_proj", "q_b_proj"), d), d)
    kv = _rope(bld, _norm32(bld, _lin(bld, n, h, d, "kv_proj", "kv_proj"), d, "kv_norm", tr), d)
    if not bld.num.training:  # DeepseekV4HCACache.update: cat onto the empty keys; the window kept is a view of it
        kv = tp.op(kv.numel, kv.elem, (kv,))
        _cached(bld, kv)
    rate = spec.compress_rate
    windows = s // rate if rate else 0
    entries = 0
    bias: Tensor | None = None
    if rate:
        csa = rate == spec.dsv4[3]
        width = 2 * d if csa else d
        ckv = _lin(bld, n, h, width, "compressor.kv_proj", "kv_proj")
        cg = _lin(bld, n, h, width, "compressor.gate_proj", "gate_proj")
        _cached(bld, ckv, cg)
        comp = _pool(bld, ckv, cg, windows, d, csa, "compressor", tr) if windows else None
        if csa:
            _indexer(bld, n, q_res, windows)
            bias = tp.op(t * (windows + 1), kv.elem, (), rg=False)  # new_full(..., -inf), scatter_ of the top-k
        else:
            bias = tp.op(t * windows, kv.elem, (), rg=False)  # new_zeros(...).masked_fill(...)
        if comp is not None:
            entries = windows
            kv = tp.op(b * (s + entries) * d, kv.elem, (kv, comp))  # cat([kv, compressed_kv], dim=2)
    skv = s + entries
    mask: Tensor | None = None
    if entries:  # the mask extended by the block bias: cat([attention_mask, block_bias], -1)
        assert bias is not None
        mask = tp.op(t * skv, kv.elem, (bias,), rg=False)
    # eager_attention_forward: repeat_kv of the one key/value head is a view (expand, then a reshape that merges a
    # size-1 dim); each matmul then copies the broadcast operand to (batch x heads, ...) for its bmm, inside the call
    k, v = tp.view(kv, b * heads * skv * d), tp.view(kv, b * heads * skv * d)
    saved_len, start = bld.kv_len, len(tp.ops)
    bld.kv_len = skv
    try:
        o = bld.sink_attention(q, k, v, q.rg or k.rg)
    finally:
        bld.kv_len = saved_len
    tp.ops[start].fwd_scratch = tp.ops[-1].fwd_scratch = k.numel * k.elem
    if bias is not None:
        tp.hold(bias, *(() if mask is None else (mask,)))  # the extended mask: a local of the attention's forward
    o = tp.op(o.numel, o.elem, (o,))  # attn_output.transpose(1, 2).contiguous()
    o = _rope(bld, o, d)  # the rope channels rotated back (cos, -sin)
    o = tp.op(o.numel, o.elem, (o,))  # reshape(..., o_groups, -1) of the transposed result: a copy
    hd = heads * d
    pg = bld.param_grad("o_a_proj", hd * olr, bld.num.param) if tr else ()
    ga = tp.op(t * g * olr, o.elem, (o,), save=(o,) if tr else (), params=pg)  # bmm per group
    if o.rg:
        tp.ops[-1].packs_weight = True
    ga = tp.op(ga.numel, ga.elem, (ga,))  # transpose(0, 1).reshape(...): a copy
    return _lin(bld, ga, g * olr, h, "o_b_proj", "o_b_proj")


def _router(bld: _B, n: Tensor) -> tuple[Tensor, Tensor]:
    """DeepseekV4TopKRouter / DeepseekV4HashRouter: ``F.linear(flat, weight)`` (bf16), the scores (sqrtsoftplus:
    softplus saves its input, sqrt its result; softmax / sigmoid save their result), the experts from the top-k of
    the scores plus the fp32 correction bias or from ``tid2eid[input_ids]``, the scores gathered, normalised
    (``weights / (sum + 1e-20)``) and scaled."""
    tp, spec, plan = bld.tp, bld.spec, bld.plan
    assert plan is not None
    h, e, k = spec.hidden_size, spec.num_experts, spec.experts_per_token
    t = n.numel // h
    logits = bld.linear(n, h, e, "router", bias=False, trainable=plan.trainable)
    if spec.dsv4[9] == 0:
        sp = tp.op(t * e, logits.elem, (logits,), save=(logits,) if logits.rg else ())
        scores = bld.ew(sp, save_out=True)
    else:
        scores = bld.ew(logits, save_out=True)
    if spec.hash_routed:
        idx = tp.op(t * k, 8, (), rg=False)  # tid2eid[input_ids.reshape(-1)].long()
    else:
        biased = tp.op(t * e, 4, (scores,), rg=False)  # scores + e_score_correction_bias (fp32)
        tp.op(t * k, 4, (biased,), rg=False)  # topk values (dropped)
        idx = tp.op(t * k, 8, (biased,), rg=False)
    w = tp.op(t * k, scores.elem, (scores, idx), save=(idx,) if scores.rg else (), grad_to=(scores,))  # gather
    den = tp.op(t, w.elem, (tp.op(t, w.elem, (w,)),))  # sum + 1e-20
    w = tp.mul(w, den)  # weights / den
    return idx, tp.op(t * k, w.elem, (w,))  # * routed_scaling_factor


def _shared(bld: _B, n: Tensor) -> Tensor:
    """DeepseekV4MLP: ``down_proj(act(gate_proj(x).clamp(max)) * up_proj(x).clamp(min, max))``."""
    tp, spec = bld.tp, bld.spec
    h, i = spec.hidden_size, spec.moe_intermediate_size
    gp = _lin(bld, n, h, i, "shared.gate_proj", "gate_proj")
    gc = tp.op(gp.numel, gp.elem, (gp,), save=(gp,) if gp.rg else ())
    up = _lin(bld, n, h, i, "shared.up_proj", "up_proj")
    uc = tp.op(up.numel, up.elem, (up,), save=(up,) if up.rg else ())
    return _lin(bld, bld.mul(bld.activation(gc), uc), i, h, "shared.down_proj", "down_proj")


def _moe(bld: _B, n: Tensor) -> Tensor:
    """DeepseekV4SparseMoeBlock.forward: the router, the routed experts (grouped_mm, blocks.moe), the shared expert
    on the block's input, their sum."""
    routed = bld.moe(n, routed=_router(bld, n))  # (the layer hides the shared expert from blocks.moe)
    return bld.add(routed, bld.call(lambda v: _shared(bld, v), n))


def dsv4_layer(bld: _B, x: Tensor) -> Tensor:
    """DeepseekV4DecoderLayer.forward (see the module docstring)."""
    spec, plan = bld.spec, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    no_shared = replace(spec, shared_expert_intermediate_size=0)
    post, comb, c = _hyper(bld, x, "attn_hc", tr)
    a = bld.call(lambda v: _attention(bld, v), _norm32(bld, c, h, "input_layernorm", tr))
    weights = bld.probs
    x2 = _mix(bld, post, a, comb, x)
    post, comb, c = _hyper(bld, x2, "ffn_hc", tr)
    saved, bld.spec = bld.spec, no_shared
    try:
        m = bld.call(lambda v: _moe(bld, v), _norm32(bld, c, h, "post_attention_layernorm", tr))
    finally:
        bld.spec = saved
    y = _mix(bld, post, m, comb, x2)
    if weights is not None:  # ``attn_output, _ = self.self_attn(...)``: ``_`` holds the eager weights to the end
        bld.tp.hold(weights)
    bld.tp.keep(y)
    return y


def dsv4_head(bld: _B, x: Tensor, trainable: bool) -> Tensor:
    """DeepseekV4HyperHead.forward: the copies collapsed before the final norm: the flattened fp32 copies normalised
    (``input_norm``) then ``F.linear`` with the fp32 ``hc_fn`` (which saves the normalised copy), ``sigmoid(mixes *
    scale + base) + eps``, ``sum(pre * x)`` in fp32, cast back."""
    tp, spec = bld.tp, bld.spec
    n, h = spec.hc_mult, spec.hidden_size
    t = x.numel // (n * h)
    normed = rms_normalize(tp, x, n * h)
    pg = bld.param_grad("hc_head.fn", n * n * h, 4) if trainable else ()
    mixes = tp.op(t * n, 4, (normed,), save=(normed,) if trainable else (), params=pg)
    if normed.rg:
        tp.ops[-1].packs_weight = True
    sp = bld.param_grad("hc_head.scale", n + 1, 4) if trainable else ()
    z = tp.op(t * n, 4, (mixes,), save=(mixes,) if trainable else (), params=sp, rg=mixes.rg or trainable)
    pre = tp.op(t * n, 4, (bld.ew(tp.op(t * n, 4, (z,)), save_out=True),))
    prod = tp.op(t * n * h, 4, (pre, x), save=((x,) if pre.rg else ()) + ((pre,) if x.rg else ()),
                 bwd_scratch=t * n * h * 4 if pre.rg else 0)
    return bld.cast(tp.op(t * h, 4, (prod,)), x.elem)


def dsv4_decode(spec: ModelSpec, batch: int, prompt: int, total: int, elem: int) -> tuple[int, int]:
    """(cache bytes, activation bytes) of a decode step: the cache as the prefill of ``prompt`` tokens leaves it (the
    full sliding-key ``cat`` and the compressor / indexer projections stay referenced through views until each layer's
    next call replaces them) with the compressed entries of ``total`` tokens, and the largest transient of a step: the
    copy ``matmul`` makes of the one key/value head broadcast to every head, over the window and the compressed
    entries (DeepseekV4HCACache keeps ``sliding_window - 1`` keys and appends the new one)."""
    d, window = spec.head_dim, spec.sliding_window or 0
    csa_rate, di = spec.dsv4[3], spec.dsv4[7]
    cache = act = 0
    for i in range(spec.num_layers):
        rate = spec.layer(i).compress_rate
        cache += batch * prompt * d * elem
        entries = total // rate if rate else 0
        if rate:
            width = 2 * d if rate == csa_rate else d
            cache += 2 * batch * prompt * width * elem + batch * entries * d * elem
        if rate == csa_rate:
            cache += 2 * batch * prompt * 2 * di * elem + batch * entries * di * elem + \
                batch * rate * (d + di) * (elem + 4)
        act = max(act, batch * spec.num_heads * (min(window, total) + entries) * d * elem)
    return cache, act
