"""The model one GPU holds: tensor-parallel shards, pipeline stages, and the workload one stage runs."""


from __future__ import annotations

from dataclasses import replace

from ..params import ParamCounts, count_params
from ..spec import ModelSpec
from ..workload import Method, Precision, Workload
from .layout import Engine


def _tp_shard(spec: ModelSpec, tp: int, ep: int) -> ModelSpec:
    """The part of every layer one tensor-parallel rank holds (Megatron: column/row-parallel linears,
    vocab-parallel embedding and head; KV heads replicated when there are fewer than ``tp``, as vLLM does)."""
    if tp == 1 and ep == 1:
        return spec
    return replace(
        spec,
        num_heads=spec.num_heads // tp,
        num_kv_heads=max(1, spec.num_kv_heads // tp),
        intermediate_size=-(-spec.intermediate_size // tp),
        vocab_size=-(-spec.vocab_size // tp),
        moe_intermediate_size=-(-spec.moe_intermediate_size // tp),
        shared_expert_intermediate_size=-(-spec.shared_expert_intermediate_size // tp),
        num_experts=spec.num_experts // ep,
        layer_overrides=tuple(replace(o, num_kv_heads=max(1, o.num_kv_heads // tp) if o.num_kv_heads else 0,
                                      intermediate_size=-(-o.intermediate_size // tp))
                              for o in spec.layer_overrides),
    )


def _stage_spec(spec: ModelSpec, layers: range) -> ModelSpec:
    if len(layers) == spec.num_layers:
        return spec
    def local(indices: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(i - layers.start for i in indices if i in layers)

    # every per-layer fact follows the stage's layers: a hybrid's mixers (Mamba / gated DeltaNet / attention), its
    # MLP-free blocks and NoPE layers as well as MoE and sliding layers and Gemma 4's layer overrides
    return replace(spec, num_layers=len(layers), moe_layers=local(spec.moe_layers),
                   sliding_layers=local(spec.sliding_layers), mlp_free_layers=local(spec.mlp_free_layers),
                   nope_layers=local(spec.nope_layers),
                   mixers=spec.mixers[layers.start:layers.stop] if spec.mixers else (),
                   layer_overrides=tuple(replace(o, layers=local(o.layers)) for o in spec.layer_overrides))


def _stage_counts(spec: ModelSpec, stage: ModelSpec, embed: bool, head: bool, pp: int) -> ParamCounts:
    """Parameters of a stage: its layers, the embedding on the first, the final norm and head on the last
    (a tied embedding is duplicated on the last stage when it is not also the first)."""
    c = count_params(stage)
    if pp == 1:
        return c
    lm_head = c.lm_head
    if head and not embed and spec.tie_word_embeddings:
        lm_head = stage.vocab_size * (stage.embed_proj_dim or stage.hidden_size)
    return ParamCounts(c.embedding if embed else 0, c.layers, c.final_norm if head else 0, lm_head if head else 0)


def _stage_workload(w: Workload, spec: ModelSpec, layers: range) -> Workload:
    """Freeze: the globally last ``k`` layers train; a stage trains its share of them."""
    if w.method is not Method.FREEZE or len(layers) == spec.num_layers:
        return w
    k = w.trainable_layers if w.trainable_layers is not None else max(1, spec.num_layers // 4)
    first = spec.num_layers - min(k, spec.num_layers)
    return w.with_(trainable_layers=max(0, layers.stop - max(first, layers.start)))


def _compute_workload(w: Workload, engine: Engine) -> Workload:
    """What the GPU computes with. DeepSpeed and Megatron-LM with bf16/fp16 hold a 16-bit module and FSDP's
    MixedPrecisionPolicy gathers 16-bit parameters, so AMP runs as a 16-bit model without autocast."""
    if engine is Engine.DDP or not w.precision.is_amp:
        return w
    return w.with_(precision=Precision.BF16 if w.precision is Precision.AMP_BF16 else Precision.FP16)
