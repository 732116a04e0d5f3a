"""MoE blocks: estimate against trace where the experts dominate the step (a small vocabulary, so the logits do not
hide them), and the autograd mechanisms their backward depends on."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan._engine.replay import layer_backward
from vramplan._engine.tape import Tape
from vramplan.api import estimate
from vramplan.hfconfig import spec_from_config
from vramplan.workload import Method, Task, Workload

_COMMON = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
               max_position_embeddings=4096)
MOE: dict[str, dict[str, Any]] = {
    # shared expert before the router, sigmoid-gated
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=1024, moe_intermediate_size=768,
                      shared_expert_intermediate_size=1024, num_experts=8, num_experts_per_tok=2, **_COMMON),
    # sigmoid router in fp32 (fp32 routing weights: the weighted expert outputs are fp32), shared expert after
    "glm4_moe": dict(model_type="glm4_moe", intermediate_size=1024, moe_intermediate_size=768, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                     head_dim=128, **_COMMON),
    # q/k RMSNorm over all heads, every layer MoE
    "olmoe": dict(model_type="olmoe", intermediate_size=768, num_experts=8, num_experts_per_tok=2, **_COMMON),
    # attention sinks (eager only), sliding/full layers, clamped-GLU experts with biases, top-k-then-softmax router
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=768, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=64, sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                    **_COMMON),
    # OLMo 2's post-norm layout with OLMoE's block
    "flex_olmo": dict(model_type="flex_olmo", intermediate_size=768, num_experts=8, num_experts_per_tok=2,
                      pad_token_id=0, **_COMMON),
    # Qwen3 attention with DeepSeek-V3's MoE
    "dots1": dict(model_type="dots1", intermediate_size=1024, moe_intermediate_size=768, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                  head_dim=128, **_COMMON),
    "mixtral": dict(model_type="mixtral", intermediate_size=1536, num_local_experts=8, num_experts_per_tok=2,
                    **_COMMON),
}
WORKLOADS = {
    "full": Workload(batch_size=2, seq_len=1024),
    "lora-ckpt": Workload(method=Method.LORA, lora_targets=("q_proj", "v_proj"), batch_size=4, seq_len=2048,
                          gradient_checkpointing=True),
    "infer": Workload(task=Task.INFER, batch_size=4, seq_len=2048, new_tokens=8),
}


@pytest.mark.parametrize("wname", sorted(WORKLOADS))
@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_estimate_matches_trace(family: str, wname: str) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    cfg, w = MOE[family], WORKLOADS[wname]
    traced = trace_workload(cfg, w, name=family).peak_allocated_bytes
    est = estimate(spec_from_config(cfg, name=family), w).peak_allocated_bytes
    assert abs(est / traced - 1) < 0.02, f"{family} {wname}: estimate {est / 2**30:.3f} vs trace {traced / 2**30:.3f}"


def test_mul_backward_holds_full_size_products() -> None:
    """``a * b`` with ``b`` broadcast and fp32 while ``a`` is bf16: MulBackward0 computes both input gradients at the
    output's shape and dtype, then the engine casts a's and sums b's down while both products are referenced. Under a
    checkpoint's recomputation the saved a and b are dropped as they are unpacked, before that."""
    n, rows = 4096, 16
    for unpacked in (False, True):
        tp = Tape(True)
        tp.unpacked_saves = unpacked
        a = tp.input(n, 2, rg=True)
        b = tp.input(rows, 4, rg=True)
        y = tp.mul(a, b)
        tp.keep(y)
        assert y.elem == 4
        bwd = layer_backward(tp)
        # relative to the forward's end: the two fp32 products, then a's bf16 and b's summed gradient beside them
        assert bwd.peak == 2 * n * 4 + (0 if unpacked else n * 2 + rows * 4)


def test_split_gradients_are_concatenated_once() -> None:
    """``gate, up = x.chunk(2)``: each half's gradient is its own buffer until SplitBackward0 concatenates them into
    one buffer of x's size; slicing instead pads each half's gradient to x's size in its own backward."""
    n = 1 << 20

    def peak(split: bool) -> int:
        tp = Tape(True)
        x = tp.input(n, 2, rg=True)
        gate, up = tp.split(x, 2) if split else (tp.view(x, n // 2), tp.view(x, n // 2))
        g2 = tp.unary(gate, save_in=True)
        y = tp.mul(g2, up)
        tp.keep(y)
        return layer_backward(tp).peak

    # at the concatenation: both halves' gradients (n bytes together) and x's (2n bytes), the saved g2 (n bytes)
    # already released
    assert peak(True) == 2 * n
    assert peak(False) > peak(True)


def test_index_backward_accumulates_in_place() -> None:
    """``index.Tensor``'s backward on CUDA accumulates into one fresh zeros buffer (``_index_put_impl_``); the trace
    must not count the out-of-place ``index_put`` that fake tensors (subclass-like) would take."""
    torch = pytest.importorskip("torch")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.kinds import Phase
    from vramplan.trace._cuda import index_backward_in_place
    from vramplan.trace._tracker import MemoryTracker

    rows, width = 4096, 1024
    with FakeTensorMode():
        x = torch.empty(rows, width, requires_grad=True)
        idx = torch.zeros(rows * 2, dtype=torch.long)
        tracker = MemoryTracker()
        tracker.overrides[torch.ops.aten.index_put.default] = index_backward_in_place
        with tracker:
            tracker.adopt(x)
            y = x[idx]
            gy = torch.empty_like(y)
            tracker.set_phase(Phase.BACKWARD)
            start = tracker.current
            y.backward(gy)
    peak = tracker.peaks[Phase.BACKWARD].bytes - start
    # the incoming gradient exists before the phase starts; backward adds the input's gradient buffer, once
    assert peak == rows * width * 4
