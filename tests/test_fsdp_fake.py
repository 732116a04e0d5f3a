"""vramplan's per-GPU FSDP2 estimate against a real FSDP2 run: ``fully_shard`` on a fake process group with
fake tensors, on CPU, traced by PyTorch's own ``FSDPMemTracker`` (torch.distributed._tools.fsdp2_mem_tracker).

The model is transformers' ``LlamaForCausalLM`` (small configs), every decoder layer and the root wrapped by
``fully_shard`` as accelerate's transformer auto-wrap does, with a ``MixedPrecisionPolicy`` (bf16 parameters,
fp32 reduction) for AMP or plain bf16 parameters, AdamW (foreach), eager attention (the kernel a CPU trace and
a GPU run share; SDPA would take CPU's math path). One step warms up (optimizer states exist), the second is
traced; the model output stays referenced through the optimizer step, as the estimator assumes.

What is compared, per rank (rank 0 holds the largest shards):
* forward/backward: ``FSDPMemTracker``'s peak, against vramplan's forward and backward phases;
* the optimizer step: the tracker's live memory before ``step()`` plus the bytes of the new storages the
  step's local (post-DTensor) ops allocate, against vramplan's optimizer-step phase. The tracker's own
  optimizer accounting is not used: for foreach AdamW on DTensor parameters it reports about 9x the
  parameter shard while the step's local ops allocate one shard-sized tensor (``_foreach_sqrt``), because
  it re-registers the optimizer states as new allocations;
* cuBLAS workspaces (2 x 32 MiB in vramplan's estimate) are subtracted: no tensor shows them.

Tolerance ±10% (the issue's); the cases land within about 7%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from vramplan import MemoryKind, spec_from_config  # noqa: E402
from vramplan.api import make_workload  # noqa: E402
from vramplan.kinds import Phase  # noqa: E402
from vramplan.parallel import FSDPMode, Layout, estimate_parallel  # noqa: E402

SMALL = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
             tie_word_embeddings=False, rms_norm_eps=1e-5)
# parameters rather than activations dominate: sharding, gathering and reduce-scatter buffers decide the peak
WIDE = dict(SMALL, hidden_size=2048, intermediate_size=5632, num_key_value_heads=4, num_hidden_layers=6)


@dataclass(frozen=True)
class Traced:
    forward_backward: int  # FSDPMemTracker's peak over forward and backward
    before_step: int  # live bytes when optimizer.step() starts
    step_allocations: int  # bytes of new storages the step's local ops create

    @property
    def step(self) -> int:
        return self.before_step + self.step_allocations

    @property
    def peak(self) -> int:
        return max(self.forward_backward, self.step)


def _trace(cfg: dict[str, Any], world: int, batch: int, seq: int, mode: FSDPMode, ckpt: bool, amp: bool) -> Traced:
    import torch.distributed as dist
    from torch._guards import active_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from transformers import LlamaConfig, LlamaForCausalLM

    class NewStorages(TorchDispatchMode):
        """Bytes of storages created by local ops (DTensor ops are let through to decompose first)."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0
            self.fake = active_fake_mode()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if any(t is DTensor for t in types):
                return NotImplemented
            out = func(*args, **(kwargs or {}))
            if active_fake_mode() is self.fake:
                seen = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                                  if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in seen)
            return out

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="eager")
        mesh = init_device_mesh("cpu", (world,))
        with FakeTensorMode():
            model = LlamaForCausalLM(config)
            if not amp:
                for p in model.parameters():
                    p.data = p.data.to(torch.bfloat16)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if amp \
                else MixedPrecisionPolicy()
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=mode is not FSDPMode.GRAD_OP)
            fully_shard(model, mesh=mesh, mp_policy=mp)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            ids = torch.randint(0, config.vocab_size, (batch, seq))
            out = model(input_ids=ids, labels=ids)  # step 1: creates the optimizer states
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            del out
            tracker = FSDPMemTracker(model, opt)
            tracker.track_inputs((ids,))
            with tracker:
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                (device, peak), = tracker.get_tracker_snapshot("peak").items()
                before = tracker.get_tracker_snapshot("current")[device]["Total"]
            counter = NewStorages()
            with counter:
                opt.step()
            opt.zero_grad()
            del out
        return Traced(peak["Total"], before, counter.bytes)
    finally:
        dist.destroy_process_group()


CASES = [
    # name, config, ranks, batch, seq, mode, checkpointing, amp
    ("activations", SMALL, 2, 2, 1024, FSDPMode.FULL, False, True),
    ("activations", SMALL, 4, 2, 1024, FSDPMode.FULL, False, True),
    ("activations", SMALL, 8, 2, 1024, FSDPMode.FULL, False, True),
    ("checkpointed", SMALL, 2, 2, 1024, FSDPMode.FULL, True, True),
    ("checkpointed", SMALL, 8, 2, 1024, FSDPMode.FULL, True, True),
    ("parameters", WIDE, 2, 1, 256, FSDPMode.FULL, False, True),
    ("parameters", WIDE, 4, 1, 256, FSDPMode.FULL, False, True),
    ("parameters", WIDE, 8, 1, 256, FSDPMode.FULL, False, True),
    ("grad-op", WIDE, 4, 1, 512, FSDPMode.GRAD_OP, False, True),
    ("pure-bf16", WIDE, 4, 1, 512, FSDPMode.FULL, True, False),
]


@pytest.mark.parametrize("name, cfg, world, batch, seq, mode, ckpt, amp", CASES,
                         ids=[f"{c[0]}-{c[2]}ranks" for c in CASES])
def test_fsdp2_per_rank_peak(name: str, cfg: dict[str, Any], world: int, batch: int, seq: int, mode: FSDPMode,
                             ckpt: bool, amp: bool) -> None:
    traced = _trace(cfg, world, batch, seq, mode, ckpt, amp)
    # the traced loop keeps ``out`` through optimizer.step(): the plain trainer layout
    w = make_workload(precision="amp-bf16" if amp else "bf16", attention="eager", batch_size=batch, seq_len=seq,
                      gradient_checkpointing=ckpt, trainer="plain")
    est = estimate_parallel(spec_from_config(cfg), w, Layout(gpus=world, fsdp=mode))
    workspace = est.breakdown[MemoryKind.WORKSPACE]
    phase = {p.phase: p.peak_allocated_bytes - workspace for p in est.phases}
    forward_backward = max(phase[Phase.FORWARD], phase[Phase.BACKWARD])
    assert forward_backward == pytest.approx(traced.forward_backward, rel=0.10)
    assert phase[Phase.OPTIMIZER_STEP] == pytest.approx(traced.step, rel=0.10)
    assert est.peak_allocated_bytes - workspace == pytest.approx(traced.peak, rel=0.10)
    # the rank's own allocation stream (vramplan.parallel.streams), replayed for its reserved memory, lands on the
    # same allocated peak: FSDP2's gathers, reduce-scatters and shards around the single-GPU programs
    assert est.replay is not None
    assert est.replay.peak_allocated_bytes - workspace == pytest.approx(traced.peak, rel=0.10)
    assert est.replay.peak_reserved_bytes >= est.replay.peak_allocated_bytes
