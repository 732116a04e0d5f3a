"""Config readers of the state-space and hybrid families (:mod:`vramplan.ssm`), keyed like
:data:`vramplan.hfconfig._READERS`. Defaults are those of each family's transformers 5.24 configuration class
(``configuration_mamba2.py``, ``configuration_bamba.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .hfconfig import _MAX_LAYERS, _Cfg, _check_heads
from .spec import Activation, MLPKind, ModelSpec, NormKind, PositionKind

if TYPE_CHECKING:  # (imported by the readers that build one: reading a config of another family needs no SSM module)
    from .ssm import SSMSpec

__all__ = ["SSM_CLASSES", "SSM_READERS"]


def _check_ssm(c: _Cfg, hidden: int, ss: SSMSpec) -> SSMSpec:
    if ss.n_heads * ss.head_dim != ss.d_inner:
        raise ConfigError(f"{c.where}: the Mamba heads ({ss.n_heads} x {ss.head_dim}) must span the intermediate size "
                          f"({ss.d_inner} = expand x hidden_size {hidden})")
    if ss.n_heads % ss.n_groups:
        raise ConfigError(f"{c.where}: the Mamba heads ({ss.n_heads}) must be a multiple of n_groups ({ss.n_groups})")
    return ss


def _expand(c: _Cfg, key: str, hidden: int) -> int:
    expand = c.float_(key, default=2, lo=0.0, hi=64.0)
    d_inner = int(expand * hidden)
    if d_inner < 1:
        raise ConfigError(f"{c.where}: {key} x hidden_size must be at least 1")
    return d_inner


def _mamba_prefixed(c: _Cfg, d_inner: int, n_heads: int, **extra: Any) -> SSMSpec:
    """The Mamba-2 mixer of the hybrid configs (Bamba, GraniteMoeHybrid, Falcon-H1), whose keys carry a ``mamba_``
    prefix, with their config classes' defaults; ``extra`` are the family's own fields."""
    from dataclasses import replace

    from .ssm import SSMSpec

    d_head = c.raw.get("mamba_d_head", "auto")
    return replace(SSMSpec(
        d_inner=d_inner, n_heads=n_heads,
        head_dim=d_inner // n_heads if d_head in ("auto", None) else c.int_("mamba_d_head"),
        n_groups=c.int_("mamba_n_groups", default=1), d_state=c.int_("mamba_d_state", default=256),
        d_conv=c.int_("mamba_d_conv", default=4, hi=1024), chunk=c.int_("mamba_chunk_size", default=256, hi=1 << 16),
        conv_bias=c.bool_("mamba_conv_bias", default=True), proj_bias=c.bool_("mamba_proj_bias", default=False)),
        **extra)


def _mamba2(c: _Cfg, family: str) -> ModelSpec:
    """Mamba-2 (modeling_mamba2.py): embeddings, ``num_hidden_layers`` Mamba2Blocks (RMSNorm + mixer, residual in
    fp32 by default), norm_f, an untied lm_head whose logits are cast with ``.float()``."""
    from .ssm import SSMSpec

    hidden = c.int_("hidden_size", default=4096)
    layers = c.int_("num_hidden_layers", default=64, hi=_MAX_LAYERS)
    d_inner = _expand(c, "expand", hidden)
    heads = c.int_("num_heads", default=128)
    ss = _check_ssm(c, hidden, SSMSpec(
        d_inner=d_inner, n_heads=heads, head_dim=c.int_("head_dim", default=64), n_groups=c.int_("n_groups", default=8),
        d_state=c.int_("state_size", default=128), d_conv=c.int_("conv_kernel", default=4, hi=1024),
        chunk=c.int_("chunk_size", default=256, hi=1 << 16), conv_bias=c.bool_("use_conv_bias", default=True),
        proj_bias=c.bool_("use_bias", default=False)))
    if c.str_("hidden_act", default="silu") not in ("silu", "swish"):
        raise ConfigError(f"{c.where}: Mamba-2 with hidden_act {c.raw.get('hidden_act')!r} is not supported (silu)")
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=32768), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=ss.head_dim, intermediate_size=d_inner,
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.RMSNORM, mlp=MLPKind.GATED,
        activation=Activation.SILU, position=PositionKind.NONE, norms_per_layer=1,
        mixers=("mamba2",) * layers, mlp_free_layers=tuple(range(layers)), ssm=ss,
        residual_fp32=c.bool_("residual_in_fp32", default=True), logits_fp32=True, program_version="5.24",
    )


def _mamba(c: _Cfg, family: str) -> ModelSpec:
    """Mamba-1 and Falcon-Mamba (modeling_mamba.py, modeling_falcon_mamba.py): embeddings, ``num_hidden_layers``
    MambaBlocks (RMSNorm + selective-scan mixer, residual in fp32 by default), norm_f, an lm_head tied to the
    embeddings by default whose logits are cast with ``.float()``. Falcon-Mamba adds weightless RMSNorms on dt, B
    and C. ``time_step_rank`` "auto" is ceil(hidden / 16) (configuration_mamba.py)."""
    from .ssm import SSMSpec

    hidden = c.int_("hidden_size", default=768)
    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    # MambaMixer sizes itself by config.intermediate_size: expand x hidden unless a saved config states it
    d_inner = c.int_("intermediate_size") if c.raw.get("intermediate_size") is not None else \
        _expand(c, "expand", hidden)
    rank = c.raw.get("time_step_rank", "auto")
    dt_rank = -(-hidden // 16) if rank in ("auto", None) else c.int_("time_step_rank")
    if c.str_("hidden_act", default="silu") not in ("silu", "swish"):
        raise ConfigError(f"{c.where}: Mamba with hidden_act {c.raw.get('hidden_act')!r} is not supported (silu)")
    ss = SSMSpec(d_inner=d_inner, n_heads=1, head_dim=d_inner, n_groups=1, d_state=c.int_("state_size", default=16),
                 d_conv=c.int_("conv_kernel", default=4, hi=1024), chunk=2048,
                 conv_bias=c.bool_("use_conv_bias", default=True), proj_bias=c.bool_("use_bias", default=False),
                 dt_rank=dt_rank, bcdt_norm="weightless" if family == "falcon_mamba" else "")
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50280), hidden_size=hidden,
        num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=d_inner, intermediate_size=d_inner,
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.RMSNORM, mlp=MLPKind.GATED,
        activation=Activation.SILU, position=PositionKind.NONE, norms_per_layer=1,
        mixers=("mamba",) * layers, mlp_free_layers=tuple(range(layers)), ssm=ss,
        residual_fp32=c.bool_("residual_in_fp32", default=True), logits_fp32=True, program_version="5.24",
    )


def _jamba(c: _Cfg, family: str) -> ModelSpec:
    """Jamba (modeling_jamba.py): pre-norm decoder layers whose mixer is attention (no positional encoding) at
    ``attn_layer_offset`` every ``attn_layer_period`` layers and a Mamba-1 mixer elsewhere (weighted RMSNorms on dt,
    B and C; no ``mamba_inner_fn`` path), and whose feed-forward is a top-k MoE (softmax router, experts as 3-D
    parameters) at ``expert_layer_offset`` every ``expert_layer_period`` layers and a SwiGLU MLP elsewhere."""
    from dataclasses import replace

    from .hfconfig import _llama_like
    from .ssm import SSMSpec

    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=4096)
    a_period = c.int_("attn_layer_period", default=8, hi=_MAX_LAYERS)
    a_offset = c.int_("attn_layer_offset", default=4, lo=0, hi=_MAX_LAYERS)
    e_period = c.int_("expert_layer_period", default=2, hi=_MAX_LAYERS)
    e_offset = c.int_("expert_layer_offset", default=1, lo=0, hi=_MAX_LAYERS)
    if a_offset >= a_period or e_offset >= e_period:
        raise ConfigError(f"{c.where}: attn_layer_offset / expert_layer_offset must be below their period")
    experts = c.int_("num_experts", default=16)
    rank = c.raw.get("mamba_dt_rank", "auto")
    if c.str_("hidden_act", default="silu") not in ("silu", "swish"):
        raise ConfigError(f"{c.where}: Jamba with hidden_act {c.raw.get('hidden_act')!r} is not supported (silu)")
    ss = SSMSpec(d_inner=_expand(c, "mamba_expand", hidden), n_heads=1, head_dim=1, n_groups=1,
                 d_state=c.int_("mamba_d_state", default=16), d_conv=c.int_("mamba_d_conv", default=4, hi=1024),
                 chunk=2048, conv_bias=c.bool_("mamba_conv_bias", default=True),
                 proj_bias=c.bool_("mamba_proj_bias", default=False),
                 dt_rank=-(-hidden // 16) if rank in ("auto", None) else c.int_("mamba_dt_rank"), bcdt_norm="rms",
                 inner_fn=False)
    ss = replace(ss, head_dim=ss.d_inner)
    raw = dict(c.raw)
    for key, default in (("hidden_size", hidden), ("num_hidden_layers", layers), ("intermediate_size", 14336),
                         ("vocab_size", 65536), ("num_attention_heads", 32), ("num_key_value_heads", 8),
                         ("max_position_embeddings", 262144)):
        raw.setdefault(key, default)
    raw["num_local_experts"] = max(experts, 2)  # one "expert" is the dense MLP (JambaMLP): no MoE layer at all
    raw["num_experts_per_tok"] = min(c.int_("num_experts_per_tok", default=2), raw["num_local_experts"])
    spec = _llama_like(_Cfg(raw, c.where), "mixtral")
    moe = tuple(i for i in range(layers) if experts > 1 and i % e_period == e_offset)
    return replace(spec, family=family, position=PositionKind.NONE, sliding_window=None, sliding_layers=(),
                   mixers=tuple("attention" if i % a_period == a_offset else "mamba" for i in range(layers)),
                   moe_layers=moe, num_experts=experts if moe else 0, ssm=ss,
                   tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), program_version="5.24")


# configuration_zamba2.py: the layer pattern Zamba2Config writes when layers_block_type is not given (54 layers)
_ZAMBA2_DEFAULT = (["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3
                   + ["hybrid"] + ["mamba"] * 2)


def _zamba2(c: _Cfg, family: str) -> ModelSpec:
    """Zamba2 (modeling_zamba2.py): Mamba-2 decoder layers (RMSNorm + mixer + residual, no MLP), and hybrid layers
    that first run a shared transformer block on ``cat([hidden, original embeddings])`` (attention over 2 x hidden
    with heads of 2 x hidden / heads, no RoPE unless ``use_mem_rope``; an MLP of ``intermediate_size``, 4 x hidden
    by default), project it with their own ``linear`` and add it to the Mamba-2 layer's input. ``num_mem_blocks``
    weight sets are reused in turn; each hybrid layer has its own adapters."""
    from .ssm import SharedBlock, SSMSpec

    layers = c.int_("num_hidden_layers", default=54, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=2560)
    raw_types = c.raw.get("layers_block_type")
    types = list(_ZAMBA2_DEFAULT) if raw_types is None else raw_types
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("mamba", "linear_attention", "hybrid") for t in types):
        raise ConfigError(f"{c.where}: layers_block_type must list one of mamba / hybrid per layer ({layers})")
    heads = c.int_("num_attention_heads", default=32)
    kv = c.int_("num_key_value_heads", default=heads) if c.raw.get("num_key_value_heads") is not None else heads
    if (2 * hidden) % heads or heads % kv:
        raise ConfigError(f"{c.where}: 2 x hidden_size must divide into num_attention_heads, and those into "
                          "num_key_value_heads")
    d_inner = _expand(c, "mamba_expand", hidden)
    n_heads = c.int_("n_mamba_heads", default=8)
    bias = c.bool_("add_bias_linear", default=False)
    head_dim = c.int_("mamba_headdim") if c.raw.get("mamba_headdim") is not None else d_inner // n_heads
    ss = _check_ssm(c, hidden, SSMSpec(
        d_inner=d_inner, n_heads=n_heads, head_dim=head_dim, n_groups=c.int_("mamba_ngroups", default=1),
        d_state=c.int_("mamba_d_state", default=64), d_conv=c.int_("mamba_d_conv", default=4, hi=1024),
        chunk=c.int_("chunk_size", default=256, hi=1 << 16), conv_bias=True, proj_bias=bias))
    inter = c.int_("intermediate_size", default=4 * hidden) if c.raw.get("intermediate_size") is not None \
        else 4 * hidden
    blocks = c.int_("num_mem_blocks", default=1, hi=_MAX_LAYERS)
    n_hybrid = types.count("hybrid")
    ids = c.raw.get("hybrid_layer_ids")  # what a saved config says; the model sizes its adapter lists by it
    slots = len(ids) if isinstance(ids, list) else n_hybrid
    sb = SharedBlock(num_mem_blocks=blocks, adapter_rank=c.int_("adapter_rank", default=128),
                     attention_adapters=c.bool_("use_shared_attention_adapter", default=False), intermediate=inter,
                     adapter_slots=slots)
    mixers, hybrid = [], 0
    for t in types:
        if t == "hybrid":
            mixers.append("zamba_hybrid" if hybrid < blocks else "zamba_tied")
            hybrid += 1
        else:
            mixers.append("mamba2")
    rope = c.bool_("use_mem_rope", default=False)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=32000), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=c.int_("attention_head_dim") if c.raw.get("attention_head_dim") is not None else 2 * hidden // heads,
        intermediate_size=inter,
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.RMSNORM, mlp=MLPKind.GATED,
        activation=c.activation("hidden_act", default="gelu"),
        position=PositionKind.ROPE if rope else PositionKind.NONE, mlp_bias=bias,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30),
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0), norms_per_layer=1,
        mixers=tuple(mixers), mlp_free_layers=tuple(range(layers)), ssm=ss, shared_block=sb, program_version="5.24",
    )


def _zamba(c: _Cfg, family: str) -> ModelSpec:
    """Zamba (modeling_zamba.py): Mamba-1 decoder layers (RMSNorm + mixer + residual, no MLP) whose mixer splits
    ``in_proj``'s output into ``n_mamba_heads`` heads, each with its own x_proj / dt_proj weights (3-D parameters,
    not ``nn.Linear``) and its own selective scan; and hybrid layers at ``attn_layer_offset`` every
    ``attn_layer_period`` layers that first run one shared transformer block (``_tied_weights_keys``: every hybrid
    layer's ``shared_transf`` is the first one's) on ``cat([hidden, original embeddings])`` (attention over
    ``attention_hidden_size``, 2 x hidden by default; a gate/up/down MLP of ``intermediate_size``), project it with
    their own ``linear`` and add it to the Mamba layer's input."""
    from .ssm import SharedBlock, SSMSpec

    layers = c.int_("num_hidden_layers", default=76, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=3712)
    raw_types = c.raw.get("layers_block_type")
    period = c.int_("attn_layer_period", default=6, hi=_MAX_LAYERS)
    offset = c.int_("attn_layer_offset", default=4, lo=0, hi=_MAX_LAYERS)
    types = ["hybrid" if i % period == offset else "mamba" for i in range(layers)] if raw_types is None \
        else raw_types
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("mamba", "linear_attention", "hybrid") for t in types):
        raise ConfigError(f"{c.where}: layers_block_type must list one of mamba / hybrid per layer ({layers})")
    heads = c.int_("num_attention_heads", default=16)
    kv = c.int_("num_key_value_heads", default=heads) if c.raw.get("num_key_value_heads") is not None else heads
    att_in = c.int_("attention_hidden_size") if c.raw.get("attention_hidden_size") is not None else 2 * hidden
    head_dim = c.int_("attention_head_dim") if c.raw.get("attention_head_dim") is not None \
        else 2 * hidden // heads
    if att_in != 2 * hidden:
        raise ConfigError(f"{c.where}: attention_hidden_size must be 2 x hidden_size (the shared block's input is "
                          "cat([hidden, embeddings]))")
    if heads % kv:
        raise ConfigError(f"{c.where}: num_attention_heads must be a multiple of num_key_value_heads")
    d_inner = _expand(c, "mamba_expand", hidden)
    n_heads = c.int_("n_mamba_heads", default=2)
    if d_inner % n_heads:
        raise ConfigError(f"{c.where}: mamba_expand x hidden_size must divide into n_mamba_heads")
    rank = c.raw.get("mamba_dt_rank", "auto")
    if c.str_("hidden_mamba_act", default="silu") not in ("silu", "swish"):
        raise ConfigError(f"{c.where}: Zamba with hidden_mamba_act {c.raw.get('hidden_mamba_act')!r} is not "
                          "supported (silu)")
    ss = SSMSpec(d_inner=d_inner, n_heads=n_heads, head_dim=d_inner // n_heads, n_groups=1,
                 d_state=c.int_("mamba_d_state", default=16), d_conv=c.int_("mamba_d_conv", default=4, hi=1024),
                 chunk=2048, conv_bias=c.bool_("mamba_conv_bias", default=True),
                 proj_bias=c.bool_("mamba_proj_bias", default=False),
                 dt_rank=-(-hidden // 16) if rank in ("auto", None) else c.int_("mamba_dt_rank"), inner_fn=False)
    inter = c.int_("intermediate_size", default=14848)
    sb = SharedBlock(num_mem_blocks=1, adapter_rank=0, attention_adapters=False, intermediate=inter,
                     adapter_slots=0, fused_gate_up=False)
    mixers, hybrid = [], 0
    for t in types:
        if t == "hybrid":
            mixers.append("zamba_hybrid" if hybrid == 0 else "zamba_tied")
            hybrid += 1
        else:
            mixers.append("mamba")
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=32000), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=inter,
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.RMSNORM, mlp=MLPKind.GATED,
        activation=c.activation("hidden_act", default="gelu"), position=PositionKind.NONE,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30),
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0), norms_per_layer=1,
        mixers=tuple(mixers), mlp_free_layers=tuple(range(layers)), ssm=ss, shared_block=sb,
        residual_fp32=False, program_version="5.24",
    )


def _bamba(c: _Cfg, family: str) -> ModelSpec:
    """Bamba (modeling_bamba.py): LLaMA-style decoder layers whose token mixer is a Mamba-2 mixer, or attention at
    ``attn_layer_indices`` (RoPE on half of each head: ``partial_rotary_factor`` 0.5 is fixed by BambaConfig)."""
    hidden = c.int_("hidden_size", default=4096)
    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    heads = c.int_("num_attention_heads", default=32)
    kv = c.int_("num_key_value_heads", default=8)
    head_dim = _check_heads(c, hidden, heads, kv, None)
    d_inner = _expand(c, "mamba_expand", hidden)
    n_heads = c.int_("mamba_n_heads", default=128)
    ss = _check_ssm(c, hidden, _mamba_prefixed(c, d_inner, n_heads))
    attn = set(c.int_list("attn_layer_indices"))
    if any(i >= layers for i in attn):
        raise ConfigError(f"{c.where}: attn_layer_indices lists a layer beyond num_hidden_layers ({layers})")
    if c.float_("z_loss_coefficient", default=0.0, lo=0.0) > 0:
        raise ConfigError(f"{c.where}: Bamba with z_loss_coefficient > 0 is not supported by estimate (its logsumexp "
                          "over the logits is not modelled); run `vramplan trace`")
    return _llama_attention_hybrid(c, family, hidden, layers, heads, kv, head_dim, ss, rotary_fraction=0.5,
                                   mixers=tuple("attention" if i in attn else "mamba2" for i in range(layers)))


def _llama_attention_hybrid(c: _Cfg, family: str, hidden: int, layers: int, heads: int, kv: int, head_dim: int,
                            ss: SSMSpec, **extra: Any) -> ModelSpec:
    """The spec of a hybrid whose attention and gated MLP are LLaMA's, with the keys and defaults Bamba and
    Falcon-H1 share (RoPE, ``attention_bias`` on q/k/v/o, ``mlp_bias``); ``extra`` are the family's own fields."""
    bias = c.bool_("attention_bias", default=False)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=128000), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=c.int_("intermediate_size", default=14336),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.RMSNORM, mlp=MLPKind.GATED,
        activation=c.activation("hidden_act", default="silu"), position=PositionKind.ROPE,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30), qkv_bias=bias, o_bias=bias,
        mlp_bias=c.bool_("mlp_bias", default=False),
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0), ssm=ss, program_version="5.24", **extra,
    )


# transformers configuration_utils.py _LEGACY_LAYER_TYPE_REMAP: published configs still say mamba / attention
_MIXER_OF = {"linear_attention": "mamba2", "mamba": "mamba2", "full_attention": "attention", "attention": "attention"}


def _layer_types(c: _Cfg, key: str, layers: int, default: str) -> tuple[str, ...]:
    raw = c.raw.get(key)
    if raw is None:
        return (_MIXER_OF[default],) * layers
    if not isinstance(raw, list) or len(raw) != layers or not all(isinstance(t, str) for t in raw):
        raise ConfigError(f"{c.where}: {key} must list one layer type per layer ({layers})")
    bad = sorted({t for t in raw if t not in _MIXER_OF})
    if bad:
        raise ConfigError(f"{c.where}: {key} holds {', '.join(bad)}; supported: {', '.join(sorted(_MIXER_OF))}")
    return tuple(_MIXER_OF[t] for t in raw)


def _mamba_heads(c: _Cfg, hidden: int) -> SSMSpec:
    """The ``mamba_*`` keys of Bamba / Granite 4.0 (``mamba_d_head`` "auto": expand x hidden / heads)."""
    d_inner = _expand(c, "mamba_expand", hidden)
    n_heads = c.int_("mamba_n_heads", default=128)
    return _check_ssm(c, hidden, _mamba_prefixed(c, d_inner, n_heads))


def _granitemoehybrid(c: _Cfg, family: str) -> ModelSpec:
    """Granite 4.0 (modeling_granitemoehybrid.py): GraniteMoeShared decoder layers (embedding / residual / logits
    multipliers, MoE + always-on shared MLP, or the shared MLP alone when ``num_local_experts`` is 0) whose mixer
    is a Mamba-2 mixer or attention per ``layer_types``; attention uses RoPE only when ``position_embedding_type``
    is "rope" (Granite 4.0-H: none)."""
    from dataclasses import replace

    from .hfconfig import _llama_like

    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=4096)
    ss = _mamba_heads(c, hidden)
    mixers = _layer_types(c, "layer_types", layers, "linear_attention")
    experts = c.int_("num_local_experts", default=8, lo=0)
    raw = dict(c.raw)
    raw.setdefault("hidden_size", hidden)
    raw.setdefault("num_hidden_layers", layers)
    raw.setdefault("intermediate_size", 11008)
    raw.setdefault("vocab_size", 32000)
    shared = c.int_("shared_intermediate_size", default=1024)
    if experts:
        raw["shared_intermediate_size"] = shared
        spec = replace(_llama_like(_Cfg(raw, c.where), "granitemoeshared"), gate_up_fused=True)
    else:  # the shared MLP alone: input_linear (gate and up fused) and output_linear
        raw["intermediate_size"] = shared
        spec = replace(_llama_like(_Cfg(raw, c.where), "granite"), gate_up_fused=True)
    rope = c.raw.get("position_embedding_type") == "rope"
    return replace(spec, family=family, mixers=mixers, ssm=ss, program_version="5.24",
                   position=PositionKind.ROPE if rope else PositionKind.NONE)


def _lfm2(c: _Cfg, family: str) -> ModelSpec:
    """LFM2 (modeling_lfm2.py): pre-norm decoder layers (operator_norm, ffn_norm) whose mixer is a gated short
    convolution (``Lfm2ShortConv``) or attention with per-head q/k RMSNorm (``layer_types``, else
    ``full_attn_idxs``); a SwiGLU MLP (w1, w3, w2) whose width ``Lfm2MLP`` adjusts (2/3, multiplier, rounded up
    to ``block_multiple_of``); the final ``embedding_norm``; tied embeddings by default."""
    from dataclasses import replace


    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=2560)
    inter = c.int_("block_ff_dim", "intermediate_size", default=12288)
    if c.bool_("block_auto_adjust_ff_dim", default=True):
        inter = int(2 * inter / 3)
        mult = c.opt_float("block_ffn_dim_multiplier")
        if mult is not None:
            inter = int(mult * inter)
            multiple = c.int_("block_multiple_of", default=256)
            inter = multiple * ((inter + multiple - 1) // multiple)
    types = c.raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"{c.where}: layer_types must list one layer type per layer ({layers})")
        mixers = tuple("conv" if t == "conv" else "attention" for t in types)
    else:
        full = c.int_list("full_attn_idxs") if c.raw.get("full_attn_idxs") is not None else list(range(layers))
        mixers = tuple("attention" if i in full else "conv" for i in range(layers))
    spec = _lfm2_stack(c, family, hidden, layers, inter, mixers)
    return replace(spec, program_version="5.24")


def _lfm2_moe(c: _Cfg, family: str) -> ModelSpec:
    """LFM2-MoE (modeling_lfm2_moe.py): LFM2's layers (gated short convolutions or attention with per-head q/k RMSNorm,
    by ``layer_types``) whose first ``num_dense_layers`` have a SwiGLU MLP of ``intermediate_size`` (not adjusted) and
    the others a MoE block: a bf16 sigmoid router whose fp32 ``expert_bias`` buffer only steers the top-k, the
    gathered bf16 weights renormalised and scaled, grouped_mm experts of ``moe_intermediate_size``."""
    from dataclasses import replace


    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=2048)
    types = c.raw.get("layer_types")
    if not isinstance(types, list) or len(types) != layers or not all(isinstance(t, str) for t in types):
        # Lfm2MoeConfig leaves layer_types None and its decoder layer indexes it: transformers cannot build that
        raise ConfigError(f"{c.where}: layer_types must list one layer type per layer ({layers}): 'conv' or "
                          "'full_attention'")
    dense = c.int_("num_dense_layers", default=2, lo=0, hi=_MAX_LAYERS)
    experts = c.int_("num_experts", default=32)
    top_k = c.int_("num_experts_per_tok", default=4)
    if top_k > experts:
        raise ConfigError(f"{c.where}: num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
    spec = _lfm2_stack(c, family, hidden, layers, c.int_("intermediate_size", default=7168),
                       tuple("conv" if t == "conv" else "attention" for t in types))
    return replace(spec, num_experts=experts, experts_per_token=top_k,
                   moe_intermediate_size=c.int_("moe_intermediate_size", default=1792),
                   moe_layers=tuple(range(min(dense, layers), layers)), router_sigmoid=True, program_version="5.24")


def _lfm2_stack(c: _Cfg, family: str, hidden: int, layers: int, inter: int, mixers: tuple[str, ...]) -> ModelSpec:
    """What LFM2 and LFM2-MoE share: Qwen3-style attention layers (q/k per-head RMSNorm, SwiGLU, RoPE, no biases)
    beside gated short convolutions (``conv_L_cache``), tied embeddings by default."""
    from dataclasses import replace

    from .hfconfig import _llama_like
    from .ssm import SSMSpec

    raw = {**c.raw, "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
           "num_attention_heads": c.int_("num_attention_heads", default=32),
           "num_key_value_heads": c.int_("num_key_value_heads", default=8),
           "vocab_size": c.int_("vocab_size", default=65536), "attention_bias": False, "mlp_bias": False,
           "hidden_act": "silu", "use_sliding_window": False}
    spec = _llama_like(_Cfg(raw, c.where), "qwen3")
    ss = SSMSpec(d_inner=hidden, n_heads=1, head_dim=hidden, n_groups=1, d_state=0,
                 d_conv=c.int_("conv_L_cache", default=3, hi=1024), chunk=1,
                 conv_bias=c.bool_("conv_bias", default=False), gated_norm=False)
    return replace(spec, family=family, mixers=mixers, ssm=ss,
                   tie_word_embeddings=c.bool_("tie_word_embeddings", default=True),
                   max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30))


def _lfm3(c: _Cfg, family: str) -> ModelSpec:
    """LFM3 (modeling_lfm3.py): LFM2's gated short convolutions (``Lfm3ShortConv`` is ``Lfm2ShortConv``) beside
    sliding-window and full attention (q/k RMSNorm per head, RoPE from fp32 cos/sin tables over the whole head:
    the full layers' "proportional" RoPE pads its partial rotation to the head, and a per-head output gate
    ``sigmoid(g_proj(x))`` with ``use_attention_gate``); sandwich norms (``use_sandwich_norm``: a norm after each
    sublayer too); a SwiGLU MLP of ``intermediate_size`` (w1, w3, w2); the final ``embedding_norm``. ``layer_types``
    defaults to full attention at i % 4 == 2, sliding at i % 4 == 0 (i > 0), convolutions elsewhere."""
    from dataclasses import replace

    from .hfconfig import _llama_like
    from .ssm import SSMSpec

    layers = c.int_("num_hidden_layers", default=24, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=2048)
    raw_types = c.raw.get("layer_types")
    types = ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
             for i in range(layers)] if raw_types is None else raw_types
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("conv", "sliding_attention", "full_attention") for t in types):
        raise ConfigError(f"{c.where}: layer_types must list one of conv / sliding_attention / full_attention per "
                          f"layer ({layers})")
    raw = {k: v for k, v in c.raw.items() if k not in ("layer_types", "sliding_window", "use_sliding_window")}
    raw |= {"hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": c.int_("intermediate_size", default=7680),
            "num_attention_heads": c.int_("num_attention_heads", default=16),
            "num_key_value_heads": c.int_("num_key_value_heads", default=4),
            "head_dim": c.int_("head_dim", default=128), "vocab_size": c.int_("vocab_size", default=128000),
            "attention_bias": c.bool_("attention_bias", default=False), "mlp_bias": False, "hidden_act": "silu"}
    spec = _llama_like(_Cfg(raw, c.where), "qwen3")  # q/k per-head RMSNorm, SwiGLU, RoPE
    ss = SSMSpec(d_inner=hidden, n_heads=1, head_dim=hidden, n_groups=1, d_state=0,
                 d_conv=c.int_("conv_L_cache", default=7, hi=1024), chunk=1,
                 conv_bias=c.bool_("conv_bias", default=False), gated_norm=False)
    window = c.raw.get("sliding_window", 256)
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window is not None else ()
    return replace(spec, family=family, ssm=ss, program_version="5.24",
                   mixers=tuple("conv" if t == "conv" else "attention" for t in types),
                   sliding_window=c.int_("sliding_window", default=256) if sliding else None, sliding_layers=sliding,
                   norms_per_layer=4 if c.bool_("use_sandwich_norm", default=True) else 2,
                   rope_style="fp32_tables", rotary_fraction=1.0,
                   attn_head_gate=c.bool_("use_attention_gate", default=True),
                   tie_word_embeddings=c.bool_("tie_word_embeddings", default=True),
                   max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30))


def _falcon_h1(c: _Cfg, family: str) -> ModelSpec:
    """Falcon-H1 (modeling_falcon_h1.py): every layer runs attention and a Mamba-2 mixer side by side on one
    normed input (``FalconH1DecoderLayer``), with muP multipliers around each (embedding, attention in/out, keys,
    SSM in/out and the projection's ``mup_vector``, MLP gate/down, lm_head); the mixer's width is ``mamba_d_ssm``
    and its gated RMSNorm optional (``mamba_rms_norm``)."""
    hidden = c.int_("hidden_size", default=4096)
    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    heads = c.int_("num_attention_heads", default=32)
    kv = c.int_("num_key_value_heads", default=8)
    head_dim = c.opt_int("head_dim") or hidden // heads
    d_ssm = c.opt_int("mamba_d_ssm") if "mamba_d_ssm" in c.raw else 1024
    d_inner = d_ssm if d_ssm else _expand(c, "mamba_expand", hidden)
    n_heads = c.int_("mamba_n_heads", default=128)
    ss = _check_ssm(c, hidden, _mamba_prefixed(
        c, d_inner, n_heads, gated_norm=c.bool_("mamba_rms_norm", default=False),
        out_bias=c.bool_("projectors_bias", default=False), mup=True))
    if ss.gated_norm:
        raise ConfigError(f"{c.where}: Falcon-H1 with mamba_rms_norm is not supported by estimate yet; run "
                          "`vramplan trace`")
    return _llama_attention_hybrid(c, family, hidden, layers, heads, kv, head_dim, ss, embed_scale=True,
                                   logit_scale=True, mlp_multipliers=True, key_multiplier=True,
                                   mixers=("parallel",) * layers)


_NEMOTRON_BLOCKS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def _nemotron_h(c: _Cfg, family: str) -> ModelSpec:
    """Nemotron-H (modeling_nemotron_h.py): a stack of single-sublayer blocks (``NemotronHBlock``: RMSNorm with an
    fp32 weight product, then a Mamba-2 mixer, attention without RoPE, or a ReLU² MLP of up/down projections) from
    ``layers_block_type`` (or the legacy ``hybrid_override_pattern``: M, *, -, E); the logits are cast to fp32.
    MoE blocks ("E", Nemotron 3: ``NemotronHMoE``) route with an fp32 sigmoid router (group-limited top-k, a
    correction bias) to non-gated ReLU² experts, optionally between ``fc1_latent_proj`` / ``fc2_latent_proj``, and
    add a non-gated shared expert."""
    from .ssm import SSMSpec

    types = c.raw.get("layers_block_type", c.raw.get("layer_types"))
    if types is None and isinstance(c.raw.get("hybrid_override_pattern"), str):
        pattern = c.raw["hybrid_override_pattern"]
        bad = sorted({ch for ch in pattern if ch not in _NEMOTRON_BLOCKS})
        if bad:
            raise ConfigError(f"{c.where}: hybrid_override_pattern holds {', '.join(bad)}; known: M, *, -, E")
        types = [_NEMOTRON_BLOCKS[ch] for ch in pattern]
    if types is None:
        types = ["linear_attention", "moe", "full_attention", "mlp"]
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"{c.where}: layers_block_type must be a list of block types")
    kinds = {"linear_attention": "mamba2", "mamba": "mamba2", "full_attention": "attention", "attention": "attention",
             "mlp": "none", "moe": "moe"}
    bad = sorted({t for t in types if t not in kinds})
    if bad:
        raise ConfigError(f"{c.where}: layers_block_type holds {', '.join(bad)}; known: {', '.join(sorted(kinds))}")
    kinds_of = tuple(kinds[t] for t in types)
    # an MoE block ("E") is an MLP-only block whose MLP is the MoE (NemotronHMoE)
    moe_layers = tuple(i for i, k in enumerate(kinds_of) if k == "moe")
    mixers = tuple("none" if k == "moe" else k for k in kinds_of)
    moe: dict[str, Any] = {}
    if moe_layers:
        if c.bool_("mlp_bias", default=False):
            raise ConfigError(f"{c.where}: Nemotron-H MoE blocks with mlp_bias are not modelled by estimate; run "
                              "`vramplan trace` on this config")
        experts = c.int_("n_routed_experts", "num_local_experts", default=8)
        latent = c.raw.get("moe_latent_size")
        moe = {"num_experts": experts, "experts_per_token": c.int_("num_experts_per_tok", default=2, hi=experts),
               "moe_intermediate_size": c.int_("moe_intermediate_size", default=7688),
               "shared_expert_intermediate_size": c.int_("moe_shared_expert_intermediate_size", default=7688, lo=0),
               "moe_layers": moe_layers, "router_fp32": True, "router_sigmoid": True, "expert_glu": "none",
               "moe_latent_size": c.int_("moe_latent_size") if latent is not None else 0}
    layers = len(mixers)
    hidden = c.int_("hidden_size", default=4096)
    heads = c.int_("num_attention_heads", default=32)
    kv = c.int_("num_key_value_heads", default=heads)
    n_heads = c.int_("mamba_num_heads", default=128)
    ss = SSMSpec(
        d_inner=n_heads * c.int_("mamba_head_dim", default=64), n_heads=n_heads,
        head_dim=c.int_("mamba_head_dim", default=64), n_groups=c.int_("n_groups", "mamba_n_groups", default=8),
        d_state=c.int_("ssm_state_size", default=128),
        d_conv=c.int_("conv_kernel", "mamba_d_conv", default=4, hi=1024),
        chunk=c.int_("chunk_size", "mamba_chunk_size", default=128, hi=1 << 16),
        conv_bias=c.bool_("use_conv_bias", "mamba_conv_bias", default=True),
        proj_bias=c.bool_("use_bias", default=False))
    if ss.n_heads % ss.n_groups:
        raise ConfigError(f"{c.where}: mamba_num_heads ({ss.n_heads}) must be a multiple of n_groups ({ss.n_groups})")
    act = c.str_("mlp_hidden_act", default="relu2")
    if act != "relu2":
        raise ConfigError(f"{c.where}: Nemotron-H with mlp_hidden_act {act!r} is not supported (relu2)")
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=131072), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=c.opt_int("head_dim") or hidden // heads, intermediate_size=c.int_("intermediate_size", default=21504),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.FP32_WEIGHT_RMSNORM,
        mlp=MLPKind.PLAIN, activation=Activation.RELU2, position=PositionKind.NONE, norms_per_layer=1,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30),
        qkv_bias=c.bool_("attention_bias", default=False), o_bias=c.bool_("attention_bias", default=False),
        mlp_bias=c.bool_("mlp_bias", default=False),
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        mixers=mixers, mlp_free_layers=tuple(i for i, m in enumerate(mixers) if m != "none"), ssm=ss,
        residual_fp32=c.bool_("residual_in_fp32", default=False), logits_fp32=True, program_version="5.24", **moe,
    )


def _gdn_layer_types(c: _Cfg, layers: int) -> tuple[str, ...]:
    """``layer_types`` (linear_attention / full_attention), else the config class's pattern: full attention every
    ``full_attention_interval`` (4) layers, at i + 1 divisible by it (configuration_qwen3_next.py)."""
    raw = c.raw.get("layer_types")
    if raw is None:
        every = c.int_("full_attention_interval", default=4, hi=_MAX_LAYERS)
        return tuple("gdn" if (i + 1) % every else "attention" for i in range(layers))
    if not isinstance(raw, list) or len(raw) != layers or not all(isinstance(t, str) for t in raw):
        raise ConfigError(f"{c.where}: layer_types must list one layer type per layer ({layers})")
    kinds = {"linear_attention": "gdn", "full_attention": "attention"}
    bad = sorted({t for t in raw if t not in kinds})
    if bad:
        raise ConfigError(f"{c.where}: layer_types holds {', '.join(bad)}; supported: full_attention, "
                          "linear_attention")
    return tuple(kinds[t] for t in raw)


def _gdn(c: _Cfg, layout: str, neg_eigval: bool = False) -> SSMSpec:
    """The gated DeltaNet's sizes (``linear_*`` keys) mapped onto :class:`SSMSpec` (see :mod:`vramplan.gdn`)."""
    from .ssm import SSMSpec

    nk = c.int_("linear_num_key_heads", default=16)
    nv = c.int_("linear_num_value_heads", default=32)
    if nv % nk:
        raise ConfigError(f"{c.where}: linear_num_value_heads ({nv}) must be a multiple of linear_num_key_heads ({nk})")
    hk = c.int_("linear_key_head_dim", default=128)
    hv = c.int_("linear_value_head_dim", default=128)
    return SSMSpec(d_inner=nv * hv, n_heads=nv, head_dim=hv, n_groups=nk, d_state=hk,
                   d_conv=c.int_("linear_conv_kernel_dim", default=4, hi=1024), chunk=64, conv_bias=False,
                   gdn_layout=layout, neg_eigval=neg_eigval)


# (layers, hidden, intermediate, vocab, heads, kv heads, experts, experts per token) of each configuration class
_QWEN_GDN_DEFAULTS: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "qwen3_next": (48, 2048, 5632, 151936, 16, 2, 512, 10),  # configuration_qwen3_next.py
    "qwen3_5_text": (32, 4096, 12288, 248320, 16, 4, 0, 0),  # configuration_qwen3_5.py Qwen3_5TextConfig
    "qwen3_5_moe_text": (40, 2048, 0, 248320, 16, 2, 256, 8),  # configuration_qwen3_5_moe.py Qwen3_5MoeTextConfig
}


def _qwen3_next(c: _Cfg, family: str) -> ModelSpec:
    """Qwen3-Next and Qwen3.5 (modeling_qwen3_next.py, modeling_qwen3_5.py, modeling_qwen3_5_moe.py): pre-norm
    decoder layers whose mixer is a gated DeltaNet (:mod:`vramplan.gdn`) or gated attention (q_proj also makes a
    per-head output gate, q/k RMSNorm per head, RoPE on ``partial_rotary_factor`` (0.25) of each head); every norm
    is the zero-centred ``x * (1 + weight)`` RMSNorm; the MLP is a SwiGLU or a Qwen2-MoE-style block (softmax top-k
    router, experts as 3-D parameters, a shared expert run first and scaled by ``sigmoid(shared_expert_gate)``)."""
    from dataclasses import replace

    from .hfconfig import _llama_like, _rotary_fraction

    layers_d, hidden_d, inter_d, vocab_d, heads_d, kv_d, experts_d, topk_d = _QWEN_GDN_DEFAULTS[family]
    layers = c.int_("num_hidden_layers", default=layers_d, hi=_MAX_LAYERS)
    mixers = _gdn_layer_types(c, layers)
    raw = dict(c.raw)
    for key, default in (("hidden_size", hidden_d), ("num_hidden_layers", layers), ("vocab_size", vocab_d),
                         ("num_attention_heads", heads_d), ("num_key_value_heads", kv_d), ("head_dim", 256),
                         ("max_position_embeddings", 32768)):
        raw.setdefault(key, default)
    moe = family != "qwen3_5_text" and c.int_("num_experts", default=experts_d, lo=0) > 0
    if moe:
        raw.setdefault("num_experts", experts_d)
        raw.setdefault("num_experts_per_tok", topk_d)
        raw.setdefault("moe_intermediate_size", 512)
        raw.setdefault("intermediate_size", inter_d or raw["moe_intermediate_size"])
        if family == "qwen3_5_moe_text":  # every layer is MoE (Qwen3_5MoeDecoderLayer)
            raw.pop("decoder_sparse_step", None)
            raw.pop("mlp_only_layers", None)
    else:
        raw.setdefault("intermediate_size", inter_d)
    raw["use_sliding_window"] = False
    raw["attention_bias"] = c.bool_("attention_bias", default=False)
    spec = _llama_like(_Cfg(raw, c.where), "qwen3_moe" if moe else "qwen3")
    extra: dict[str, Any] = {}
    if moe:
        si = c.int_("shared_expert_intermediate_size", default=512, lo=0)
        extra = {"shared_expert_intermediate_size": si, "shared_expert_gate": bool(si), "shared_expert_first": True}
    frac = _rotary_fraction(c) if any("partial_rotary_factor" in (c.raw.get(k) or {}) for k in
                                      ("rope_parameters", "rope_scaling")) or "partial_rotary_factor" in c.raw \
        else 0.25
    return replace(spec, family=family, norm=NormKind.GEMMA_RMSNORM, attn_output_gate=True, rotary_fraction=frac,
                   mixers=mixers, ssm=_gdn(c, "qkvz" if family == "qwen3_next" else "split"),
                   tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), program_version="5.24",
                   **extra)


def _olmo_hybrid(c: _Cfg, family: str) -> ModelSpec:
    """OLMo Hybrid (modeling_olmo_hybrid.py): OLMo-3 attention layers (no pre-norm: post_attention / post_feedforward
    RMSNorms on the sublayers' outputs, q/k RMSNorm over all heads, RoPE unless ``rope_parameters`` has no
    ``rope_theta``) and pre-norm gated DeltaNet layers with separate q/k/v/a/b/g projections, ``beta * 2``
    (``linear_allow_neg_eigval``) and ``o_proj`` (:mod:`vramplan.gdn`); a SwiGLU MLP everywhere. ``layer_types``
    defaults to full attention at every fourth layer (i % 4 == 3), at least the last."""
    from dataclasses import replace

    from .hfconfig import _FAMILIES, _llama_like

    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=3840)
    heads = c.int_("num_attention_heads", default=30)
    if c.raw.get("layer_types") is None:
        mixers = ["attention" if i % 4 == 3 else "gdn" for i in range(layers)]
        if "attention" not in mixers:
            mixers[-1] = "attention"
        types = tuple(mixers)
    else:
        types = _gdn_layer_types(c, layers)
    nk = c.int_("linear_num_key_heads") if c.raw.get("linear_num_key_heads") is not None else heads
    hk = c.int_("linear_key_head_dim") if c.raw.get("linear_key_head_dim") is not None else int(0.75 * hidden / nk)
    raw = {**c.raw, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "linear_num_key_heads": nk, "linear_key_head_dim": hk,
           "linear_num_value_heads": c.raw.get("linear_num_value_heads") or heads,
           "linear_value_head_dim": c.raw.get("linear_value_head_dim") or 2 * hk}
    ss = _gdn(_Cfg(raw, c.where), "olmo", neg_eigval=c.bool_("linear_allow_neg_eigval", default=True))
    raw.pop("layer_types", None)
    for key, default in (("intermediate_size", 11008), ("vocab_size", 100352),
                         ("max_position_embeddings", 65536)):
        raw.setdefault(key, default)
    if c.raw.get("num_key_value_heads") is None:
        raw["num_key_value_heads"] = heads
    spec = _llama_like(_Cfg(raw, c.where), "olmo2", _FAMILIES["olmo2"])
    rope = c.raw.get("rope_parameters")
    has_rope = isinstance(rope, dict) and rope.get("rope_theta") is not None
    # OlmoHybridRMSNorm: (weight * x.float() normed).to(dtype): the product is fp32 (what NemotronHRMSNorm makes)
    return replace(spec, family=family, mixers=types, ssm=ss, program_version="5.24",
                   norm=NormKind.FP32_WEIGHT_RMSNORM, position=spec.position if has_rope else PositionKind.NONE)



# (layers, hidden, intermediate, expert width, vocab, heads, experts, experts per token, leading dense layers,
#  rms_norm_eps) of each configuration class (configuration_kimi_linear.py, configuration_bailing_hybrid.py)
_KDA_DEFAULTS: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "kimi_linear": (27, 2304, 9216, 1024, 163840, 32, 256, 8, 1),
    "bailing_hybrid": (42, 2048, 5120, 512, 157184, 32, 512, 8, 2),
}
# the config classes' attribute_map: the names a config.json (and to_dict) uses for the keys the readers take
_KDA_ALIASES = (("num_experts", "n_routed_experts"), ("num_local_experts", "n_routed_experts"),
                ("num_experts_per_token", "num_experts_per_tok"), ("num_shared_experts", "n_shared_experts"),
                ("num_expert_group", "n_group"), ("model_max_length", "max_position_embeddings"))


def _kda_types(c: _Cfg, family: str, layers: int) -> tuple[str, ...]:
    """Which layers are Kimi Delta Attention ("gdn") and which MLA ("attention"): ``layer_types``, else Kimi's
    ``linear_attn_config`` lists (1-indexed ``full_attn_layers`` / ``kda_layers``), else the config class's
    pattern (Kimi: full attention at every fourth layer from layer 4, ``i and i % 4 == 0``; Ling 3: at every
    ``layer_group_size``-th layer)."""
    raw = c.raw.get("layer_types")
    lac = c.raw.get("linear_attn_config")
    if raw is None and family == "kimi_linear" and isinstance(lac, dict) and lac.get("full_attn_layers") is not None:
        full = lac.get("full_attn_layers")
        if not isinstance(full, list) or not all(isinstance(i, int) and 1 <= i <= layers for i in full):
            raise ConfigError(f"{c.where}: linear_attn_config.full_attn_layers must list 1-indexed layers")
        raw = ["full_attention" if i + 1 in full else "linear_attention" for i in range(layers)]
    if raw is None:
        if family == "kimi_linear":
            raw = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(layers)]
        else:
            every = c.int_("layer_group_size", default=6, hi=_MAX_LAYERS)
            raw = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    # the decoder layer reads layer_types[layer_idx]: entries past the last layer are not read
    if not isinstance(raw, list) or len(raw) < layers or not set(raw[:layers]) <= {"linear_attention",
                                                                                   "full_attention"}:
        raise ConfigError(f"{c.where}: layer_types must list linear_attention or full_attention for each of the "
                          f"{layers} layers")
    return tuple("gdn" if t == "linear_attention" else "attention" for t in raw[:layers])


def _kimi_linear(c: _Cfg, family: str) -> ModelSpec:
    """Kimi Linear and Ling 3 (modeling_kimi_linear.py, modeling_bailing_hybrid.py): pre-norm decoder layers whose
    mixer is Kimi Delta Attention (:mod:`vramplan.kda`) or DeepSeek's multi-head latent attention (Kimi: no rotary
    embedding at all; Ling 3: interleaved RoPE and a per-head ``sigmoid(g_proj(x).float())`` output gate), and whose
    MLP is a SwiGLU or DeepSeek-V3's MoE block (fp32 sigmoid router with group-limited top-k, grouped-GEMM experts,
    shared experts after them); ``mlp_layer_types`` (default: ``first_k_dense_replace`` dense layers first)."""
    from dataclasses import replace

    from .hfconfig import _Facts, _llama_like
    from .ssm import SSMSpec

    layers_d, hidden_d, inter_d, moe_d, vocab_d, heads_d, experts_d, topk_d, dense_d = _KDA_DEFAULTS[family]
    raw: dict[str, Any] = dict(c.raw)
    for key, canonical in _KDA_ALIASES:
        if key in raw and canonical not in raw:
            raw[canonical] = raw[key]
    layers = _Cfg(raw, c.where).int_("num_hidden_layers", default=layers_d, hi=_MAX_LAYERS)
    mixers = _kda_types(c, family, layers)
    for key, default in (("hidden_size", hidden_d), ("num_hidden_layers", layers), ("vocab_size", vocab_d),
                         ("intermediate_size", inter_d), ("moe_intermediate_size", moe_d),
                         ("num_attention_heads", heads_d), ("n_routed_experts", experts_d),
                         ("num_experts_per_tok", topk_d), ("n_shared_experts", 1), ("kv_lora_rank", 512),
                         ("qk_rope_head_dim", 64), ("qk_nope_head_dim", 128), ("v_head_dim", 128),
                         ("max_position_embeddings", 1048576 if family == "kimi_linear" else 262144)):
        raw.setdefault(key, default)
    raw.setdefault("q_lora_rank", None)  # both classes default to a plain q_proj
    if raw.get("num_key_value_heads") is None:
        raw["num_key_value_heads"] = raw["num_attention_heads"]
    cc = _Cfg(raw, c.where)
    types = raw.get("mlp_layer_types")
    if types is None:
        dense = cc.int_("first_k_dense_replace", default=dense_d, lo=0, hi=_MAX_LAYERS)
        raw["mlp_layer_types"] = ["dense" if i < dense else "sparse" for i in range(layers)]
    facts = _Facts(version="5.24", moe="deepseek", mla=True, mlp_types=0, mla_defaults=(0, 512, 128, 64, 128))
    spec = _llama_like(_Cfg(raw, c.where), family, facts)
    heads = cc.int_("num_attention_heads")
    if family == "kimi_linear":
        # linear_attn_config (a checkpoint's sub-dict) overrides the linear_* keys (KimiLinearConfig.__post_init__)
        got = c.raw.get("linear_attn_config")
        lac: dict[str, Any] = dict(got) if isinstance(got, dict) else {}
        sub = _Cfg({"head_dim": raw.get("linear_head_dim", 128), "num_heads": raw.get("linear_num_heads", 32),
                    "short_conv_kernel_size": raw.get("linear_conv_kernel_dim", 4), **lac}, c.where)
        d, nh, kernel = sub.int_("head_dim"), sub.int_("num_heads"), sub.int_("short_conv_kernel_size", hi=1024)
        layout, safe = "kda", False
    else:
        # BailingHybridConfig.__post_init__: linear_head_dim = head_dim, linear_num_heads = num_attention_heads,
        # the kernel = short_conv_kernel_size (head_dim is then rebound to qk_rope_head_dim); linear_* keys in the
        # config (as to_dict saves them) are set after that and win
        d = cc.int_("linear_head_dim") if raw.get("linear_head_dim") is not None else cc.int_("head_dim", default=128)
        nh = cc.int_("linear_num_heads") if raw.get("linear_num_heads") is not None else heads
        kernel = cc.int_("linear_conv_kernel_dim", hi=1024) if raw.get("linear_conv_kernel_dim") is not None else \
            cc.int_("short_conv_kernel_size", default=4, hi=1024)
        layout, safe = "kda_full", cc.bool_("kda_safe_gate", default=True)
    ss = SSMSpec(d_inner=nh * d, n_heads=nh, head_dim=d, n_groups=nh, d_state=d, d_conv=kernel, chunk=64,
                 conv_bias=False, gdn_layout=layout, neg_eigval=safe, gated_norm_fp32=True)
    extra: dict[str, Any] = {}
    if family == "kimi_linear":
        extra["position"] = PositionKind.NONE  # KimiLinearAttention applies no rotary embedding
    else:
        extra["mla_head_gate"] = "fp32"
    return replace(spec, family=family, mixers=mixers, ssm=ss, program_version="5.24", **extra)


def _axk2(c: _Cfg, family: str) -> ModelSpec:
    """A.X-K2 (modeling_axk2.py): DeepSeek-V3.2's MLA with the DSA lightning indexer and MoE block, except that the
    query projection ``q_gate_proj`` reads ``cat([q_resid, q_compressed])`` and also makes a per-channel output gate
    (``attn_output * sigmoid(gate.float())``), and the pre-attention norm (and a MoE layer's pre-MLP norm) is
    ``AXK2GatedRMSNorm``; ``mlp_layer_types`` defaults to one leading dense layer (``first_k_dense_replace``)."""
    from dataclasses import replace

    from .hfconfig import _Facts, _llama_like

    raw: dict[str, Any] = dict(c.raw)
    for key, default in (("hidden_size", 2048), ("intermediate_size", 5120), ("moe_intermediate_size", 512),
                         ("num_hidden_layers", 48), ("num_attention_heads", 32), ("num_key_value_heads", 32),
                         ("n_routed_experts", 128), ("num_experts_per_tok", 8), ("n_shared_experts", 1),
                         ("vocab_size", 163840), ("max_position_embeddings", 131072), ("index_n_heads", 16),
                         ("index_head_dim", 128), ("index_topk", 2048), ("first_k_dense_replace", 1)):
        raw.setdefault(key, default)  # configuration_axk2.py
    if raw.get("q_lora_rank") is None or not isinstance(raw.get("q_lora_rank", 384), int) or \
            raw.get("q_lora_rank", 384) <= 0:
        raise ConfigError(f"{c.where}: A.X-K2 needs a positive q_lora_rank (AXK2Config refuses others)")
    facts = _Facts(version="5.24", moe="deepseek", mla=True, dsa=True, mlp_types=-2,
                   mla_defaults=(384, 128, 64, 32, 64))
    spec = _llama_like(_Cfg(raw, c.where), family, facts)
    return replace(spec, mla_q_gate=True, gated_norm_rank=_Cfg(raw, c.where).int_("gated_norm_rank", default=16),
                   program_version="5.24")


# Dots3NoteTextConfig.__post_init__'s sizes of the sliding layers (the released checkpoint's swa_* keys)
_DOTS3_SWA = {"num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1024, "kv_lora_rank": 1024,
              "head_dim": 256, "qk_nope_head_dim": 192, "v_head_dim": 128}


def _dots3_note_text(c: _Cfg, family: str) -> ModelSpec:
    """Dots 3 Note's language model (modeling_dots3_note.py ``Dots3NoteForCausalLM``): DeepSeek-V3's MoE block and
    MLA whose layers differ by ``layer_types``: "indexed_attention" layers run the DSA lightning indexer (interleaved
    RoPE), "sliding_attention" layers a sliding window with their own head count, latent width and q/k head size
    (``per_layer_config``, else the class's ``swa_*`` defaults); every layer scales its q and kv latents, norms the
    shared rotary key and gates each head's output by ``sigmoid(g_proj(x))``. ``mlp_layer_types`` defaults to one
    leading dense layer; the shared expert is ``shared_experts_intermediate_size`` x ``n_shared_experts`` wide."""
    from dataclasses import replace

    from .hfconfig import _Facts, _llama_like
    from .spec import LayerOverride

    raw: dict[str, Any] = dict(c.raw)
    for key, default in (("hidden_size", 5120), ("intermediate_size", 13824), ("moe_intermediate_size", 1536),
                         ("num_hidden_layers", 46), ("num_attention_heads", 128), ("num_key_value_heads", 128),
                         ("n_routed_experts", 256), ("num_experts_per_tok", 8), ("n_shared_experts", 1),
                         ("vocab_size", 152064), ("max_position_embeddings", 524288), ("index_n_heads", 64),
                         ("index_head_dim", 128), ("index_topk", 2048), ("first_k_dense_replace", 1),
                         ("kv_lora_rank", 512), ("q_lora_rank", 1024), ("qk_rope_head_dim", 64),
                         ("qk_nope_head_dim", 128), ("v_head_dim", 128)):
        raw.setdefault(key, default)  # configuration_dots3_note.py Dots3NoteTextConfig
    cc = _Cfg(raw, c.where)
    layers = cc.int_("num_hidden_layers", hi=_MAX_LAYERS)
    types = raw.get("layer_types")
    if types is None:
        dsa = "full_attention" if raw.get("use_dsa") is False else "indexed_attention"
        types = [dsa if not raw.get("use_sliding_window", True) or i < 2 or i % 4 == 1 else "sliding_attention"
                 for i in range(layers)]
    elif raw.get("use_dsa") is not None:  # legacy checkpoints call the DSA layers full_attention
        old, new = ("full_attention", "indexed_attention") if raw["use_dsa"] else ("indexed_attention",
                                                                                   "full_attention")
        types = [new if t == old else t for t in types] if isinstance(types, list) else types
    kinds = ("indexed_attention", "full_attention", "sliding_attention")
    if not isinstance(types, list) or len(types) < layers or not set(types[:layers]) <= set(kinds):
        raise ConfigError(f"{c.where}: layer_types must list one of {', '.join(kinds)} for each of the {layers} layers")
    types = types[:layers]
    if any(t == "full_attention" for t in types) and any(t == "indexed_attention" for t in types):
        raise ConfigError(f"{c.where}: full and indexed attention layers together are not modelled by estimate; run "
                          "vramplan trace")
    per = raw.get("per_layer_config") or {}
    if not isinstance(per, dict):
        raise ConfigError(f"{c.where}: per_layer_config must map layer indices to overrides")
    swa = {k: raw.get(f"swa_{k}", v) for k, v in _DOTS3_SWA.items()}
    base = {"num_attention_heads": cc.int_("num_attention_heads"), "num_key_value_heads": cc.int_(
        "num_key_value_heads"), "q_lora_rank": cc.int_("q_lora_rank"), "kv_lora_rank": cc.int_("kv_lora_rank"),
        "head_dim": cc.int_("head_dim", default=256), "qk_nope_head_dim": cc.int_("qk_nope_head_dim"),
        "v_head_dim": cc.int_("v_head_dim"), "qk_rope_head_dim": cc.int_("qk_rope_head_dim")}
    given = {int(k): v for k, v in per.items() if isinstance(k, int) or (isinstance(k, str) and k.isdigit())}
    groups: dict[tuple[int, int, int, bool], list[int]] = {}
    for i, t in enumerate(types):
        if "per_layer_config" in raw:  # a saved config: its overrides over the model-wide values
            over = given.get(i, {})
            if not isinstance(over, dict):
                raise ConfigError(f"{c.where}: per_layer_config[{i}] must be a mapping")
            sizes = {**base, **over}
        else:  # the class puts its swa_* sizes on the sliding layers (and the rotary width head_dim - nope)
            sizes = {**base, **swa, "qk_rope_head_dim": raw.get("swa_qk_rope_head_dim", swa["head_dim"] -
                                                                 swa["qk_nope_head_dim"])} \
                if t == "sliding_attention" else base
        unknown = set(sizes) - set(base)
        fixed = [k for k in ("q_lora_rank", "v_head_dim", "qk_rope_head_dim") if sizes[k] != base[k]]
        if unknown or fixed or sizes["num_key_value_heads"] != sizes["num_attention_heads"]:
            raise ConfigError(f"{c.where}: layer {i} overrides {', '.join(sorted(unknown) + fixed) or 'its KV heads'}"
                              ", which vramplan estimate does not model per layer; run vramplan trace")
        group = (int(sizes["num_attention_heads"]), int(sizes["kv_lora_rank"]), int(sizes["qk_nope_head_dim"]),
                 t == "indexed_attention")
        groups.setdefault(group, []).append(i)
    raw["mlp_layer_types"] = raw.get("mlp_layer_types") or [
        "dense" if i < cc.int_("first_k_dense_replace", lo=0, hi=_MAX_LAYERS) else "sparse" for i in range(layers)]
    facts = _Facts(version="5.24", moe="deepseek", mla=True, dsa=True, mlp_types=1,
                   mla_defaults=(1024, 512, 128, 64, 128))
    spec = _llama_like(_Cfg({k: v for k, v in raw.items() if k not in ("layer_types", "per_layer_config",
                                                                      "sliding_window")}, c.where), family, facts)
    rd = spec.qk_rope_head_dim
    overrides = tuple(LayerOverride(layers=tuple(idx), num_heads=nh, num_kv_heads=nh, kv_lora_rank=kvr,
                                    head_dim=nope + rd, dsa=indexed)
                      for (nh, kvr, nope, indexed), idx in groups.items())
    shared = cc.int_("shared_experts_intermediate_size", default=1536) * cc.int_("n_shared_experts", lo=1)
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return replace(spec, layer_overrides=overrides, mla_latent_scale=True, mla_head_gate="native",
                   shared_expert_intermediate_size=shared, sliding_layers=sliding,
                   sliding_window=cc.int_("sliding_window", default=512) if sliding else None, program_version="5.24")

# configuration_lara_mini.py: the released pattern, period 5, when layer_types is not given
_LARA_PATTERN = ("linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention")


def _lara_mini(c: _Cfg, family: str) -> ModelSpec:
    """Lara-mini (modeling_lara_mini.py): pre-norm decoder layers whose mixer is a gated DeltaNet (Qwen3.5's
    projections, an all-fp32 gated norm), sliding-window or full attention (q/k RMSNorm per head, no output gate);
    every norm applies its weight in fp32 (``weight.to(fp32) * x``); every layer's MLP is a MoE block whose router
    runs in fp32 (``F.linear(x.float(), weight.float())``) and whose shared expert is added without a gate, after
    the routed experts."""
    from dataclasses import replace

    from .hfconfig import _llama_like

    layers = c.int_("num_hidden_layers", default=34, hi=_MAX_LAYERS)
    raw_types = c.raw.get("layer_types")
    types = [_LARA_PATTERN[i % 5] for i in range(layers)] if raw_types is None else raw_types
    kinds = {"linear_attention": "gdn", "full_attention": "attention", "sliding_attention": "attention"}
    if not isinstance(types, list) or len(types) != layers or not all(t in kinds for t in types):
        raise ConfigError(f"{c.where}: layer_types must list one of linear_attention / sliding_attention / "
                          f"full_attention per layer ({layers})")
    raw = {k: v for k, v in c.raw.items() if k not in ("layer_types", "sliding_window", "use_sliding_window")}
    for key, default in (("hidden_size", 1024), ("num_hidden_layers", layers), ("vocab_size", 151936),
                         ("num_attention_heads", 16), ("num_key_value_heads", 4), ("head_dim", 128),
                         ("max_position_embeddings", 131072), ("num_experts", 128), ("num_experts_per_tok", 4),
                         ("moe_intermediate_size", 512)):
        raw.setdefault(key, default)
    raw["intermediate_size"] = raw["moe_intermediate_size"]
    spec = _llama_like(_Cfg(raw, c.where), "qwen3_moe")
    ss = replace(_gdn(c, "split"), gated_norm_fp32=True)
    window = c.int_("sliding_window", default=512)
    return replace(spec, family=family, norm=NormKind.FP32_WEIGHT_RMSNORM, mixers=tuple(kinds[t] for t in types),
                   ssm=ss, moe_layers=tuple(range(layers)), router_fp32=True,
                   shared_expert_intermediate_size=c.int_("shared_expert_intermediate_size", default=512, lo=0),
                   sliding_window=window,
                   sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                   tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), program_version="5.24")


def _recurrent_gemma(c: _Cfg, family: str) -> ModelSpec:
    """RecurrentGemma / Griffin (configuration_recurrent_gemma.py, modeling_recurrent_gemma.py): pre-norm layers
    whose temporal block is the RG-LRU recurrent block (:mod:`vramplan.rglru`) or local attention (a sliding
    window of ``attention_window_size``, RoPE on ``partial_rotary_factor`` (0.5) of each head, q/k/v biased by
    ``attention_bias``, o_proj always biased), ``block_types`` tiled over the stack; Gemma's zero-centred RMSNorm,
    sqrt(hidden) embedding scale and tied head; a gated gelu-tanh MLP of ``intermediate_size // 2`` with biases;
    the logits soft-capped by ``logits_soft_cap``."""
    from dataclasses import replace

    from .hfconfig import _FAMILIES, _llama_like, _rotary_fraction
    from .ssm import SSMSpec

    layers = c.int_("num_hidden_layers", default=26, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=2560)
    heads = c.int_("num_attention_heads", default=10)
    blocks = c.raw.get("block_types", ["recurrent", "recurrent", "attention"])
    if not isinstance(blocks, list) or not blocks or not all(b in ("recurrent", "attention") for b in blocks):
        raise ConfigError(f"{c.where}: block_types must list 'recurrent' / 'attention' blocks")
    mixers = tuple("rglru" if blocks[i % len(blocks)] == "recurrent" else "attention" for i in range(layers))
    lru = c.opt_int("lru_width") or hidden
    if lru % heads:
        raise ConfigError(f"{c.where}: lru_width ({lru}) must be a multiple of num_attention_heads ({heads})")
    raw = {k: v for k, v in c.raw.items() if k not in ("sliding_window", "layer_types", "final_logit_softcapping")}
    raw.update({"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                "intermediate_size": c.int_("intermediate_size", default=3 * hidden) // 2,
                "head_dim": hidden // heads, "vocab_size": c.int_("vocab_size", default=256000),
                "mlp_bias": True})
    raw.setdefault("num_key_value_heads", heads)
    spec = _llama_like(_Cfg(raw, c.where), "gemma", _FAMILIES["gemma"])
    window = c.int_("attention_window_size", default=2048)
    ss = SSMSpec(d_inner=lru, n_heads=heads, head_dim=lru // heads, n_groups=0, d_state=0,
                 d_conv=c.int_("conv1d_width", default=4, lo=1, hi=1024), chunk=0)
    return replace(spec, family=family, mixers=mixers, ssm=ss, o_bias=True, sliding_window=window,
                   sliding_layers=tuple(i for i, m in enumerate(mixers) if m == "attention"),
                   rotary_fraction=_rotary_fraction(c, 0.5),
                   logit_softcap=c.float_("logits_soft_cap", default=30.0), max_position_embeddings=None,
                   program_version="5.24")


def _rwkv(c: _Cfg, family: str) -> ModelSpec:
    """RWKV-4 (configuration_rwkv.py, modeling_rwkv.py, :mod:`vramplan.rwkv`): ``blocks`` of token-shift mixes, the
    WKV recurrence and a squared-ReLU channel mix, biased LayerNorms (block 0 also norms the embeddings), no
    positions; ``attention_hidden_size`` travels in ``head_dim`` (one head)."""
    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    hidden = c.int_("hidden_size", default=4096)
    att = c.opt_int("attention_hidden_size") or hidden
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50277), hidden_size=hidden,
        num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=att,
        intermediate_size=c.opt_int("intermediate_size") or 4 * hidden,
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=Activation.RELU2, position=PositionKind.NONE, norm_bias=True,
        embedding_layernorm=True, mixers=("rwkv",) * layers,
        max_position_embeddings=c.int_("context_length", "max_position_embeddings", default=1024, hi=1 << 30),
        program_version="5.24")


def _minimax(c: _Cfg, family: str) -> ModelSpec:
    """MiniMax-Text-01 (configuration_minimax.py, modeling_minimax.py, :mod:`vramplan.lightning`): Mixtral's
    attention (RoPE, GQA, optional sliding window) and MoE block (softmax top-k router, 3-D experts) in every layer;
    ``layer_types`` (default: full attention at even indices, lightning attention at odd ones); residuals from the
    normed stream scaled by ``*_alpha_factor`` / ``*_beta_factor``."""
    from dataclasses import replace

    from .hfconfig import _FAMILIES, _llama_like

    layers = c.int_("num_hidden_layers", default=32, hi=_MAX_LAYERS)
    raw_types = c.raw.get("layer_types")
    types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(layers)] if raw_types is None \
        else raw_types
    kinds = {"full_attention": "attention", "linear_attention": "lightning"}
    if not isinstance(types, list) or len(types) != layers or not all(t in kinds for t in types):
        raise ConfigError(f"{c.where}: layer_types must list full_attention / linear_attention once per layer "
                          f"({layers})")
    raw = {k: v for k, v in c.raw.items() if k != "layer_types"}
    for key, default in (("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 14336),
                         ("num_hidden_layers", layers), ("num_attention_heads", 32), ("num_key_value_heads", 8),
                         ("max_position_embeddings", 131072), ("num_local_experts", 8),
                         ("num_experts_per_tok", 2)):
        raw.setdefault(key, default)
    spec = _llama_like(_Cfg(raw, c.where), "mixtral", _FAMILIES["mixtral"])
    window = spec.sliding_window
    return replace(spec, family=family, mixers=tuple(kinds[t] for t in types), normed_residual=True,
                   lightning_block=c.int_("block_size", default=256, lo=1),
                   sliding_layers=tuple(i for i, t in enumerate(types) if t == "full_attention") if window else (),
                   program_version="5.24")


SSM_READERS: dict[str, Callable[[_Cfg, str], ModelSpec]] = {
    "mamba": _mamba, "falcon_mamba": _mamba, "jamba": _jamba, "zamba": _zamba, "zamba2": _zamba2, "mamba2": _mamba2,
    "bamba": _bamba,
    "granitemoehybrid": _granitemoehybrid, "lfm2": _lfm2, "falcon_h1": _falcon_h1, "nemotron_h": _nemotron_h,
    "qwen3_next": _qwen3_next, "qwen3_5_text": _qwen3_next, "qwen3_5_moe_text": _qwen3_next,
    "olmo_hybrid": _olmo_hybrid, "lara_mini": _lara_mini, "lfm3": _lfm3, "lfm2_moe": _lfm2_moe,
    "recurrent_gemma": _recurrent_gemma, "rwkv": _rwkv, "minimax": _minimax, "kimi_linear": _kimi_linear,
    "bailing_hybrid": _kimi_linear, "axk2": _axk2, "dots3_note_text": _dots3_note_text}
SSM_CLASSES: dict[str, str] = {"MambaForCausalLM": "mamba", "FalconMambaForCausalLM": "falcon_mamba",
                               "JambaForCausalLM": "jamba", "ZambaForCausalLM": "zamba",
                               "Zamba2ForCausalLM": "zamba2",
                               "Mamba2ForCausalLM": "mamba2", "BambaForCausalLM": "bamba",
                               "GraniteMoeHybridForCausalLM": "granitemoehybrid", "Lfm2ForCausalLM": "lfm2",
                               "FalconH1ForCausalLM": "falcon_h1", "NemotronHForCausalLM": "nemotron_h",
                               "Qwen3NextForCausalLM": "qwen3_next", "Qwen3_5ForCausalLM": "qwen3_5_text",
                               "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text", "OlmoHybridForCausalLM": "olmo_hybrid",
                               "LaraMiniForCausalLM": "lara_mini", "Lfm3ForCausalLM": "lfm3",
                               "Lfm2MoeForCausalLM": "lfm2_moe", "RecurrentGemmaForCausalLM": "recurrent_gemma",
                               "RwkvForCausalLM": "rwkv", "MiniMaxForCausalLM": "minimax",
                               "KimiLinearForCausalLM": "kimi_linear",
                               "BailingHybridForCausalLM": "bailing_hybrid", "AXK2ForCausalLM": "axk2",
                               "Dots3NoteForCausalLM": "dots3_note_text"}
