"""Per-GPU model states of each engine: PyTorch DDP, Megatron-LM, DeepSpeed ZeRO-1/2/3, PyTorch FSDP2."""


from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

from ..memory import ModelStates, model_states
from ..params import ParamCounts, count_params, mlp_linears
from ..spec import ModelSpec
from ..workload import Method, Precision, Workload
from .layout import ZERO3_MAX_LIVE_PARAMETERS, Engine, FSDPMode, Layout, Offload, zero_auto_buckets


# ---- one GPU's model states -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GPUStates:
    """Model states of one GPU under a layout, in bytes.

    ``model_states_bytes`` (weights + master weights + quantization constants + gradients + optimizer
    state) is what the ZeRO paper's per-GPU figures count. ``step_temporaries`` exist only during the
    optimizer step (DeepSpeed's fp32 copy of the gradient partition, the optimizer's own temporaries);
    ``gathered`` only during forward/backward (ZeRO-3/FSDP unsharded layers). In backward, gradients
    as autograd makes them stay unsharded up to ``unsharded_gradients`` bytes (the layer or module being
    reduced, FSDP's root module until the end of backward) before they are reduced into ``gradients``;
    ``gradient_transient`` (reduce buckets, the reduce-scatter input) exists once reduction starts.
    ``buffers`` exist always (DDP's gradient buckets); ``offloaded`` lives in host memory instead.
    """

    weights: int
    master_weights: int
    quantization_constants: int
    gradients: int
    optimizer_state: int
    step_temporaries: int = 0
    gathered: int = 0
    gradient_transient: int = 0
    buffers: int = 0
    offloaded: int = 0
    unsharded_gradients: int | None = None  # None: every gradient stays where autograd made it
    gradients_always: bool = False  # a gradient buffer allocated once and kept through forward (Megatron)

    @property
    def model_states_bytes(self) -> int:
        return self.weights + self.master_weights + self.quantization_constants + self.gradients + \
            self.optimizer_state

    def to_dict(self) -> dict[str, int | bool | None]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__} | \
            {"model_states_bytes": self.model_states_bytes}


# ---- per-GPU model states of each engine ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Shard:
    """What one GPU's stage holds, for the engines' formulas."""

    user: ModelStates  # states of the workload as asked (precision as given)
    compute: ModelStates  # states of the workload as the GPU computes it (see _compute_workload)
    fp32: ModelStates  # states with fp32 parameters: DeepSpeed's master copy and optimizer
    root_params: int  # embedding + final norm + head on this stage
    root_trainable: int
    embedding_trainable: int  # part of root_trainable: its gradient comes last in backward
    layer_params: int  # the largest decoder layer
    layer_trainable: int
    largest_module: int  # the largest single module (DeepSpeed ZeRO-3 gathers module by module)
    expert_params: int
    compute_bytes: int  # bytes per gathered (compute-dtype) parameter


def _shard_info(spec: ModelSpec, w: Workload, wc: Workload, counts: ParamCounts) -> _Shard:
    user = model_states(spec, w, counts)
    comp = user if wc is w else model_states(spec, wc, counts)
    # DeepSpeed's and Megatron's optimizers step fp32 copies of every trainable parameter (memory.model_states flat)
    fp32 = model_states(spec, w.with_(precision=Precision.FP32), counts, flat=True) if w.is_train else user
    L = max(1, len(counts.layers))
    root = counts.embedding + counts.final_norm + counts.lm_head
    layer = max((layer.total for layer in counts.layers), default=0)
    # the routed experts' linears (gate, up, down of every expert) of the stage's MoE layers
    expert = len(spec.moe_layers) * sum(fin * fout * n for _, fin, fout, n in mlp_linears(spec, True)[:3]) \
        if spec.is_moe else 0
    full = w.method is Method.FULL
    root_tr = root if full else (counts.final_norm + counts.lm_head if w.method is Method.FREEZE else 0)
    if not w.is_train:
        root_tr = 0
    layer_tr = layer if full and w.is_train else max(0, user.trainable_parameters - root_tr) // L
    elem = 2 if wc.precision is not Precision.FP32 else 4
    embed_tr = counts.embedding if full and w.is_train else 0
    return _Shard(user, comp, fp32, root, root_tr, embed_tr, layer, layer_tr, _largest_module(counts), expert,
                  elem)


def _sharded(nbytes: int, sh: _Shard, n: int, ep: int) -> int:
    """``nbytes`` spread over ``n`` ranks, expert parameters over ``n / ep`` (their data-parallel group)."""
    if n <= 1 or nbytes == 0:
        return nbytes
    total = max(1, sh.user.parameters)
    ne = max(1, n // ep)
    dense = Fraction(total - sh.expert_params, n) + Fraction(sh.expert_params, ne)
    return math.ceil(nbytes * dense / total)


def ddp_states(sh: _Shard, layout: Layout) -> GPUStates:
    """PyTorch DDP (and Megatron-style TP/PP without a distributed optimizer): a full replica of the stage.

    The reducer's buckets hold a flat copy of every gradient (torch/csrc/distributed/c10d/reducer.cpp,
    ``initialize_buckets``; 25 MiB buckets by default) unless ``gradient_as_bucket_view=True`` makes
    the gradients views into them.
    """
    u = sh.user
    buckets = u.gradients if layout.dp > 1 and not layout.ddp_bucket_view else 0
    return GPUStates(u.weights, u.master_weights, u.quant_constants, u.gradients, u.optimizer_state,
                     u.step_temporaries, buffers=buckets)


def megatron_states(sh: _Shard, training: bool) -> GPUStates:
    """Megatron-LM with bf16/fp16 (megatron/core/optimizer/optimizer.py Float16OptimizerWithFloat16Params,
    core/distributed/param_and_grad_buffer.py): a 16-bit module, fp32 ``main_grad`` buffers allocated once
    (``accumulate_allreduce_grads_in_fp32``), fp32 master weights and Adam states: 2 + 4 + 4 + 8 = 18 bytes
    per parameter, as theoretical_memory_usage.py counts. Without AMP the workload's own states."""
    u = sh.user
    if not (training and u.master_weights):
        return GPUStates(u.weights, u.master_weights, u.quant_constants, u.gradients, u.optimizer_state,
                         u.step_temporaries)
    T = u.trainable_parameters
    return GPUStates(sh.compute.weights, 4 * T, sh.compute.quant_constants, 4 * T, sh.fp32.optimizer_state,
                     sh.fp32.step_temporaries, unsharded_gradients=0, gradients_always=True)


def zero_states(sh: _Shard, layout: Layout, spec: ModelSpec, training: bool) -> GPUStates:
    """DeepSpeed ZeRO (Rajbhandari et al. 2019; runtime/zero/stage_1_and_2.py, stage3.py).

    With bf16/fp16 the module holds 16-bit weights and gradients; the optimizer holds fp32 master
    weights and states for its partition (2 + 2 + 12 bytes per trained parameter before sharding). ZeRO-1
    partitions the optimizer, ZeRO-2 also the gradients (16-bit partition, ``grads_in_partition``),
    ZeRO-3 also the parameters, gathering each module's parameters (plus the prefetch bucket) when it
    runs. The optimizer step makes an fp32 copy of the gradient partition (``single_grad_partition`` /
    ``_prepare_fp32_grad_for_sub_group``). Reduce buckets: ``reduce_bucket_size`` elements, doubled
    by ``overlap_comm`` (on by default for ZeRO-3). fp32 training has no master copy.
    """
    z, n, ep = layout.zero, layout.shard_degree, layout.ep
    e = sh.compute_bytes
    mixed = e == 2
    T = sh.user.trainable_parameters if training else 0
    weights, quant = sh.compute.weights, sh.compute.quant_constants
    master = 4 * T if mixed else 0
    grads = e * T
    fp32_grads = 4 * T if mixed else 0
    opt, opt_tmp = sh.fp32.optimizer_state, sh.fp32.step_temporaries
    reduce_bucket, prefetch, _ = zero_auto_buckets(spec.hidden_size)
    if layout.reduce_bucket_size is not None:
        reduce_bucket = layout.reduce_bucket_size
    overlap = layout.overlap_comm if layout.overlap_comm is not None else z == 3
    buckets = 2 if overlap else 1  # overlap_comm double-buffers the reduce bucket
    gathered = transient = 0
    unsharded: int | None = None
    if z == 3:
        weights, quant = _sharded(weights, sh, n, ep), _sharded(quant, sh, n, ep)
        live = min(ZERO3_MAX_LIVE_PARAMETERS, sh.largest_module + prefetch)
        gathered = live * e
        if T:  # a module's gradients wait for the bucket being reduced
            unsharded = sh.largest_module * e
            transient = buckets * reduce_bucket * e
    elif z == 2 and T:
        unsharded = sh.largest_module * e
        transient = buckets * reduce_bucket * e
    grads_kept = grads if z == 1 else _sharded(grads, sh, n, ep)
    master, opt = _sharded(master, sh, n, ep), _sharded(opt, sh, n, ep)
    step_tmp = _sharded(fp32_grads, sh, n, ep) + _sharded(opt_tmp, sh, n, ep)
    offloaded = 0
    if layout.offload is not Offload.NONE and T:
        # offload_optimizer: master, states and the fp32 gradient partition live in host memory; the
        # 16-bit gradient partition is copied out as it is reduced (ZeRO-2/3)
        offloaded += master + opt + step_tmp
        master = opt = step_tmp = 0
        if z >= 2:
            grads_kept = 0
    if layout.offload is Offload.OPTIMIZER_PARAMS:
        offloaded += weights + quant
        weights = quant = 0
    return GPUStates(weights, master, quant, grads_kept, opt, step_tmp, gathered, transient, 0, offloaded,
                     unsharded)


def fsdp_states(sh: _Shard, layout: Layout) -> GPUStates:
    """PyTorch FSDP2 ``fully_shard`` (torch/distributed/fsdp/_fully_shard/).

    Parameters are sharded in their stored dtype (fp32 under AMP, where a ``MixedPrecisionPolicy``
    gathers bf16/fp16 copies); gradients reduce-scatter into sharded gradients of the stored dtype.
    FULL_SHARD keeps the current and the next (prefetched) layer gathered; the root module (embedding,
    final norm, head) stays gathered from forward through backward; SHARD_GRAD_OP keeps every layer
    gathered between forward and backward. In backward a layer's unsharded gradients and the
    reduce-scatter input (in ``reduce_dtype``) exist until the reduce-scatter; the root's gradients wait
    for the end of backward. CPUOffloadPolicy moves sharded parameters, gradients and optimizer steps to
    the host.
    """
    n, ep, e = layout.shard_degree, layout.ep, sh.compute_bytes
    u, c = sh.user, sh.compute
    # bytes of gathered (compute-dtype or quantized) parameters per parameter, from the compute states
    stored = c.weights + c.quant_constants + c.master_weights
    per_param = Fraction(stored, max(1, c.parameters))
    root = math.ceil(sh.root_params * per_param)
    layer = math.ceil(sh.layer_params * per_param)
    layers_gathered = (stored - root) if layout.fsdp is FSDPMode.GRAD_OP else 2 * layer
    gathered = root + max(0, layers_gathered)
    reduce_bytes = 4 if u.master_weights else e  # MixedPrecisionPolicy(reduce_dtype=float32) under AMP
    # the reduce-scatter input (padded flat buffer in reduce_dtype) and output shard of one layer
    transient = sh.layer_trainable * reduce_bytes + -(-sh.layer_trainable // max(1, n)) * reduce_bytes
    # the head's gradients wait for the root's reduce-scatter at the end of backward, next to the layer being
    # reduced, or at the very end next to the embedding's
    head = sh.root_trainable - sh.embedding_trainable
    unsharded = (head + max(sh.layer_trainable, sh.embedding_trainable)) * e
    g = GPUStates(_sharded(u.weights, sh, n, ep), _sharded(u.master_weights, sh, n, ep),
                  _sharded(u.quant_constants, sh, n, ep), _sharded(u.gradients, sh, n, ep),
                  _sharded(u.optimizer_state, sh, n, ep), _sharded(u.step_temporaries, sh, n, ep),
                  gathered, transient, unsharded_gradients=unsharded)
    if layout.offload is Offload.OPTIMIZER_PARAMS:
        off = g.weights + g.master_weights + g.quantization_constants + g.gradients + g.optimizer_state + \
            g.step_temporaries
        g = replace(g, weights=0, master_weights=0, quantization_constants=0, gradients=0, optimizer_state=0,
                    step_temporaries=0, offloaded=off)
    return g


def _engine_states(sh: _Shard, layout: Layout, spec: ModelSpec, training: bool) -> GPUStates:
    if layout.engine is Engine.DEEPSPEED:
        return zero_states(sh, layout, spec, training)
    if layout.engine is Engine.FSDP:
        return fsdp_states(sh, layout)
    if layout.engine is Engine.MEGATRON:
        return megatron_states(sh, training)
    return ddp_states(sh, layout)


# ---- host memory -----------------------------------------------------------------------------------------
def _host_bytes(spec: ModelSpec, w: Workload, layout: Layout, per_gpu_offloaded: int) -> int:
    """Host RAM per node: what the GPUs of a node offload, or what loading the model takes, whichever is
    larger. Loading follows DeepSpeed's estimators (estimate_zero2/3_model_states_mem_needs): every
    process materializes the model in fp32, except under ZeRO-3's ``zero.Init`` (one module at a time)
    and FSDP's ``cpu_ram_efficient_loading`` (local rank 0 only)."""
    counts = count_params(spec)
    per_node = layout.gpus_per_node
    if not w.is_train:
        # serving engines (vLLM, transformers with device_map) stream each shard's tensors from memory-mapped
        # safetensors straight to its GPU: no process holds the model in host RAM
        return per_gpu_offloaded * per_node
    # DeepSpeed's estimators assume fp32 loading; otherwise the model loads in its stored dtype
    elem = 4 if layout.engine is Engine.DEEPSPEED else w.precision.param_bytes
    if layout.engine is Engine.DEEPSPEED and layout.zero == 3:
        load = elem * _largest_module(counts) * per_node
    elif layout.engine is Engine.FSDP:
        load = elem * counts.total
    else:
        load = elem * counts.total * per_node
    return max(per_gpu_offloaded * per_node, load)


def _largest_module(counts: ParamCounts) -> int:
    """Parameters of the largest single module (DeepSpeed's ``model_to_params``: a module's own params;
    a fused expert module holds every expert of its layer)."""
    modules = [counts.embedding, counts.lm_head]
    for lp in counts.layers[:1] + counts.layers[-1:]:
        modules += [fin * fout * n for _, fin, fout, n in lp.linear_shapes]
    return max(modules)
