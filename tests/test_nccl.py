"""NCCL communicator buffers (vramplan.parallel.nccl) against sizes computed by hand from NCCL's source.

Hand arithmetic (NVIDIA/nccl 2.30.7): LL = 8 x 512 x 8 x 16 = 524,288 B; LL128 = 120 x 640 x 8 x 8 = 4,915,200 B;
Simple = 4 MiB; ncclSendMem / ncclRecvMem 4,096 B each; every side rounded up to CUDA_IPC_MIN = 2 MiB.
Receiver: 4,096 + 524,288 + 4,915,200 + 4,194,304 = 9,637,888 -> 10 MiB; sender 4,096 -> 2 MiB (the two sizes
NVIDIA/nccl#1685 counts). P2P read (A100 NVLink): sender 4,096 + 4 MiB = 4,198,400 -> 6 MiB, receiver
5,443,584 -> 6 MiB. NVLS on 8 H100: 16 channels x 2 x 128 KiB x 8 steps x 8 heads = 256 MiB.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import MemoryKind, get_model
from vramplan.api import make_workload
from vramplan.parallel import FSDPMode, Layout, Links, estimate_parallel, get_link
from vramplan.parallel.nccl import (
    Communicator,
    NcclConfig,
    communicators,
    connection_bytes,
    nccl_memory,
    nvls_bytes,
)
from vramplan.units import MiB

LLAMA8 = get_model("llama-3.1-8b").spec
TRAIN = make_workload()


def test_connection_sizes_by_hand() -> None:
    assert connection_bytes() == (2 * MiB, 10 * MiB)
    assert connection_bytes(read=True) == (6 * MiB, 6 * MiB)
    assert connection_bytes(net=True) == (10 * MiB, 10 * MiB)  # LL128 + Simple 9,109,504; all three 9,633,792
    assert connection_bytes(net=True, device_buffers=False) == (0, 0)
    # NCCL_BUFFSIZE=16 MiB: receiver 4,096 + 524,288 + 4,915,200 + 16,777,216 = 22,220,800 -> 22 MiB
    assert connection_bytes(NcclConfig(buffsize=16 * MiB)) == (2 * MiB, 22 * MiB)
    assert nvls_bytes(16, 8) == 256 * MiB and nvls_bytes(16, 1) == 0


def test_ddp_on_8_h100_by_hand() -> None:
    # 24 channels x (ring pair + the tree's other direction) x 12 MiB = 576 MiB, + 256 MiB NVLS
    mem = nccl_memory(Layout(gpus=8), TRAIN)
    (data,) = mem.communicators
    assert (data.channels, data.connections) == (24, 96)
    assert (data.ring_tree_bytes, data.nvls_bytes, data.p2p_bytes) == (576 * MiB, 256 * MiB, 0)
    assert mem.total_bytes == 832 * MiB
    # NCCL_NVLS_ENABLE=0 drops the NVLS part; NCCL_MAX_NCHANNELS scales the rest linearly (NVIDIA/nccl#986)
    assert nccl_memory(Layout(gpus=8), TRAIN, config=NcclConfig(nvls=False)).total_bytes == 576 * MiB
    assert nccl_memory(Layout(gpus=8), TRAIN, config=NcclConfig(nvls=False, max_channels=4)).total_bytes == 96 * MiB


def test_two_ranks_share_the_ring_and_tree_peer() -> None:
    # NVIDIA/nccl#964 (4 A100, NVLink): a 2-rank group needs less than a 3- or 4-rank one, and 3 and 4 the same;
    # the difference is the tree's second peer: 12 MiB per channel
    a100 = {n: nccl_memory(Layout(gpus=n), TRAIN, intra_node="nvlink-3").total_bytes for n in (2, 3, 4)}
    assert a100[3] == a100[4] == 2 * a100[2] == 24 * 24 * MiB


def test_all_to_all_connects_every_peer_on_32_channels() -> None:
    # NVIDIA/nccl#1685 (8 H100, all_to_all_single): 32 channels per pair, 10 MiB + 2 MiB per connection
    comms = communicators(Layout(gpus=8, ep=8), TRAIN)
    expert = next(c for c in comms if c.group == "expert")
    assert expert.p2p_peers == 7 and expert.local_ranks == 8
    mem = nccl_memory(Layout(gpus=8, ep=8), TRAIN)
    ep = next(c for c in mem.communicators if c.communicator.group == "expert")
    assert ep.p2p_bytes == 7 * 32 * 12 * MiB and ep.ring_tree_bytes == 0


def test_groups_of_combined_layouts() -> None:
    groups = {c.group: c for c in communicators(Layout(gpus=16, nodes=2, tp=2, pp=2, sequence_parallel=True),
                                                TRAIN)}
    assert set(groups) == {"tensor", "data", "pipeline", "world"}  # no group is the world: its barrier's ring
    assert groups["world"].ops == ("barrier",) and (groups["world"].ranks, groups["world"].local_ranks) == (16, 8)
    assert groups["tensor"].ops == ("all-reduce", "reduce-scatter", "all-gather")
    assert (groups["data"].ranks, groups["data"].local_ranks) == (4, 4)
    assert (groups["pipeline"].ranks, groups["pipeline"].local_ranks, groups["pipeline"].p2p_peers) == (2, 1, 1)
    hsdp = {c.group: c for c in communicators(Layout(gpus=16, nodes=2, fsdp=FSDPMode.HYBRID), TRAIN)}
    assert (hsdp["shard"].ranks, hsdp["replicate"].ranks, hsdp["replicate"].local_ranks) == (8, 2, 1)
    assert "all-reduce" not in hsdp["shard"].ops  # FSDP runs all-gather and reduce-scatter: ring + NVLS, no tree


def test_pipeline_stages_and_the_tied_embedding_group() -> None:
    gemma = get_model("gemma-2-2b").spec  # tied embedding: the first and last stage all-reduce its gradient
    assert gemma.tie_word_embeddings

    def groups(stage: int | None) -> dict[str, Communicator]:
        return {c.group: c for c in communicators(Layout(gpus=8, tp=2, pp=4), TRAIN, gemma, stage)}

    first, middle, last, most = groups(0), groups(1), groups(3), groups(None)
    assert first["pipeline"].p2p_peers == last["pipeline"].p2p_peers == 1
    assert middle["pipeline"].p2p_peers == most["pipeline"].p2p_peers == 2
    assert "embedding" in first and "embedding" in last and "embedding" not in middle and "embedding" in most
    assert first["embedding"].local_ranks == 2  # ranks 0 and 6 of one node
    # one pipeline peer: 32 channels x (10 + 2) MiB; the embedding group: 2 ranks, 24 x 12 MiB + 64 MiB NVLS
    mem = nccl_memory(Layout(gpus=8, tp=2, pp=4), TRAIN, gemma, stage=0)
    by = {c.communicator.group: c.total_bytes for c in mem.communicators}
    assert by["pipeline"] == 32 * 12 * MiB and by["embedding"] == (24 * 12 + 64) * MiB
    assert by["world"] == 24 * 12 * MiB  # ring only, no NVLS for a barrier
    llama = {c.group for c in communicators(Layout(gpus=8, tp=2, pp=4), TRAIN, LLAMA8, 0)}
    assert "embedding" not in llama  # untied head: nothing to all-reduce
    assert "world" not in {c.group for c in communicators(Layout(gpus=8, zero=3), TRAIN)}


def test_links_without_nccl_and_one_gpu() -> None:
    assert nccl_memory(Layout(gpus=1), TRAIN).total_bytes == 0
    amd = nccl_memory(Layout(gpus=8), TRAIN, intra_node="infinity-fabric-mi300")
    assert not amd.modelled and amd.total_bytes == 0
    assert get_link("pcie-4").nccl is not None and get_link("pcie-4").nccl.nvls_channels == 0
    # PCIe: 2 channels, 2 ranks: 2 x 12 MiB
    assert nccl_memory(Layout(gpus=2), TRAIN, intra_node="pcie-4").total_bytes == 24 * MiB


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4]), st.sampled_from(["nvlink-3", "nvlink-4", "pcie-4"]),
       st.integers(1, 64))
def test_memory_is_linear_in_channels_and_grows_with_buffsize(tp: int, dp: int, link: str, channels: int) -> None:
    lay = Layout(gpus=tp * dp, tp=tp)
    small = nccl_memory(lay, TRAIN, intra_node=link, config=NcclConfig(nvls=False, max_channels=channels))
    one = nccl_memory(lay, TRAIN, intra_node=link, config=NcclConfig(nvls=False, max_channels=1))
    full = get_link(link).nccl
    assert full is not None
    assert small.total_bytes == min(channels, full.coll_channels) * one.total_bytes
    big = nccl_memory(lay, TRAIN, intra_node=link, config=NcclConfig(buffsize=8 * MiB))
    assert big.total_bytes >= nccl_memory(lay, TRAIN, intra_node=link).total_bytes


def test_estimate_total_grows_by_the_nccl_term() -> None:
    one = estimate_parallel(LLAMA8, TRAIN, Layout(gpus=1))
    assert one.nccl_bytes == 0 and one.breakdown[MemoryKind.NCCL_BUFFERS] == 0
    eight = estimate_parallel(LLAMA8, TRAIN, Layout(gpus=8, zero=3))
    assert eight.nccl_bytes == 832 * MiB  # the data group runs all-reduce, reduce-scatter and all-gather
    assert eight.breakdown[MemoryKind.NCCL_BUFFERS] == eight.nccl_bytes
    assert eight.total_bytes == eight.breakdown.total
    without = eight.total_bytes - eight.nccl_bytes
    assert without == eight.peak_allocated_bytes + eight.breakdown[MemoryKind.ALLOCATOR_SLACK] + \
        eight.breakdown[MemoryKind.CUDA_CONTEXT]
    assert any("NCCL buffers outside PyTorch's caching allocator: 832 MiB" in a for a in eight.assumptions)
    pcie = estimate_parallel(LLAMA8, TRAIN, Layout(gpus=8, zero=3), Links("pcie-4", "ib-ndr"))
    assert pcie.nccl_bytes == 2 * 24 * MiB  # 2 channels, ring + tree, no NVLS
    section = eight.to_dict()
    json.dumps(section)
    assert section["nccl_bytes"] == 832 * MiB and section["breakdown"]["nccl_buffers"] == 832 * MiB
    assert section["nccl"]["communicators"][0]["group"] == "data"


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        NcclConfig(max_channels=0)
    with pytest.raises(ValueError):
        NcclConfig(buffsize=-1)
