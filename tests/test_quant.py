"""Quantized checkpoints: weights equal the sum of the checkpoint's tensors, for headers written here from each
format's documented layout (the shapes below are transcribed independently of vramplan.quant)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from vramplan.checkpoint import read_safetensors_header
from vramplan.errors import ConfigError, VramplanError, WorkloadError
from vramplan.hfconfig import spec_from_config
from vramplan.memory import model_states
from vramplan.workload import Task, WeightsQuant, Workload

H, INTER, V, L, HEADS, KV = 256, 640, 1000, 2, 4, 2
HD = H // HEADS
LINEARS = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, KV * HD), "self_attn.v_proj": (H, KV * HD),
           "self_attn.o_proj": (H, H), "mlp.gate_proj": (H, INTER), "mlp.up_proj": (H, INTER),
           "mlp.down_proj": (INTER, H)}  # name: (in_features K, out_features N)
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1}
BASE = {"model_type": "llama", "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": L,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": V, "torch_dtype": "bfloat16"}


def c(a: int, b: int) -> int:
    return -(-a // b)


def gptq(k: int, n: int, b: int = 4, g: int = 128) -> dict[str, tuple[str, tuple[int, ...]]]:
    # auto_gptq/nn_modules/qlinear: qweight [in*bits/32, out], qzeros [groups, out*bits/32], scales, g_idx
    return {"qweight": ("I32", (k * b // 32, n)), "qzeros": ("I32", (c(k, g), n * b // 32)),
            "scales": ("F16", (c(k, g), n)), "g_idx": ("I32", (k,))}


def awq(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # awq/modules/linear/gemm.py WQLinear_GEMM: qweight [in, out/8], qzeros [in/g, out/8], scales [in/g, out]
    return {"qweight": ("I32", (k, n // 8)), "qzeros": ("I32", (c(k, 128), n // 8)), "scales": ("F16", (c(k, 128), n))}


def w4a16(k: int, n: int, sym: bool = True, actorder: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    # compressed_tensors pack_quantized: weight_packed [out, in/8] int32, weight_scale [out, in/g], weight_shape [2]
    t = {"weight_packed": ("I32", (n, k // 8)), "weight_scale": ("BF16", (n, c(k, 128))),
         "weight_shape": ("I64", (2,))}
    if not sym:
        t["weight_zero_point"] = ("I32", (c(n, 8), c(k, 128)))
    if actorder:
        t["weight_g_idx"] = ("I32", (k,))
    return t


def fp8_block(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # DeepSeek-V3 / FineGrainedFP8: weight fp8 [out, in], weight_scale_inv fp32 [ceil(out/128), ceil(in/128)]
    return {"weight": ("F8_E4M3", (n, k)), "weight_scale_inv": ("F32", (c(n, 128), c(k, 128)))}


def fp8_channel_static(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # compressed-tensors float-quantized, strategy channel, static input: weight, weight_scale [out,1], input_scale
    return {"weight": ("F8_E4M3", (n, k)), "weight_scale": ("BF16", (n, 1)), "input_scale": ("F32", (1,))}


def bnb4(k: int, n: int, dq: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    # bitsandbytes Params4bit serialisation (QuantState.as_dict(packed=True)), blocksize 64
    blocks = c(k * n, 64)
    t = {"weight": ("U8", (c(k * n, 2), 1)), "weight.quant_map": ("F32", (16,))}
    if dq:
        t |= {"weight.absmax": ("U8", (blocks,)), "weight.nested_absmax": ("F32", (c(blocks, 256),)),
              "weight.nested_quant_map": ("F32", (256,))}
    else:
        t["weight.absmax"] = ("F32", (blocks,))
    return t


def fbgemm(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # transformers FbgemmFp8Linear: weight fp8 [out, in], weight_scale fp32 [out, 1]
    return {"weight": ("F8_E4M3", (n, k)), "weight_scale": ("F32", (n, 1))}


def nvfp4(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # compressed-tensors nvfp4-pack-quantized: two fp4 per byte, an fp8 scale per 16, two global fp32 scales
    return {"weight_packed": ("U8", (n, k // 2)), "weight_scale": ("F8_E4M3", (n, k // 16)),
            "weight_global_scale": ("F32", (1,)), "input_global_scale": ("F32", (1,))}


def hqq4(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # hqq HQQLinear, 4-bit, group 64 along axis 1: packed uint8 (two per byte), fp16 scale and zero per group
    return {"W_q": ("U8", (k * n // 2,)), "scale": ("F16", (k * n // 64, 1)), "zero": ("F16", (k * n // 64, 1))}


def dense(k: int, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {"weight": ("BF16", (n, k))}


def checkpoint(linear_fn, skip=lambda name: False) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = {"model.embed_tokens.weight": ("BF16", (V, H)), "model.norm.weight": ("BF16", (H,)),
               "lm_head.weight": ("BF16", (V, H))}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ("BF16", (H,))
        tensors[p + "post_attention_layernorm.weight"] = ("BF16", (H,))
        for name, (k, n) in LINEARS.items():
            fn = dense if skip(p + name) else linear_fn
            for suffix, t in fn(k, n).items():
                tensors[f"{p}{name}.{suffix}"] = t
    return tensors


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # sparse: the data is never read
    return offset


def model_bytes(spec, **kw) -> int:
    st = model_states(spec, Workload(task=Task.INFER, **kw))
    return st.weights + st.quant_constants


CASES = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
             checkpoint(gptq)),
    "gptq-8bit-g64": ({"quant_method": "gptq", "bits": 8, "group_size": 64},
                      checkpoint(lambda k, n: gptq(k, n, 8, 64))),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
            checkpoint(awq)),
    "compressed-tensors w4a16 asym actorder, ignore lm_head": (
        {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
             "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128,
             "actorder": "group"}}}},
        checkpoint(lambda k, n: w4a16(k, n, sym=False, actorder=True))),
    "compressed-tensors per-layer: attention fp8, mlp w4a16": (
        {"quant_method": "compressed-tensors", "format": "mixed", "ignore": ["lm_head"], "config_groups": {
            "attn": {"targets": ["re:.*self_attn.*"], "format": "float-quantized", "weights": {
                "num_bits": 8, "type": "float", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": False, "strategy": "tensor"}},
            "mlp": {"targets": ["re:.*mlp.*"], "format": "pack-quantized", "weights": {
                "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
        checkpoint(lambda k, n: fp8_channel_static(k, n) if k == H and n in (H, KV * HD) else w4a16(k, n))),
    "fp8 block-wise (DeepSeek-V3)": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]}, checkpoint(fp8_block)),
    "fp8 with attention left in bf16 (modules_to_not_convert)": (
        {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["self_attn"]},
        checkpoint(fp8_block, skip=lambda m: "self_attn" in m)),
    "fbgemm fp8 with attention in bf16 (Llama 3.1 405B FP8)": (
        {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": [
            f"model.layers.{i}.self_attn.{p}" for i in range(L) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            + ["lm_head"]},
        checkpoint(fbgemm, skip=lambda m: "self_attn" in m)),
    "compressed-tensors nvfp4": (
        {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
             "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}}},
        checkpoint(nvfp4)),
    "hqq 4-bit g64": ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64}},
                       "skip_modules": ["lm_head"]}, checkpoint(hqq4)),
    "bitsandbytes 4-bit, transformers defaults (fp4, no double quant)": (
        {"quant_method": "bitsandbytes", "load_in_4bit": True}, checkpoint(lambda k, n: bnb4(k, n, False))),
    "bitsandbytes nf4 + double quant": (
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
         "bnb_4bit_use_double_quant": True}, checkpoint(lambda k, n: bnb4(k, n, True))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weights_equal_checkpoint_tensors(case: str, tmp_path: Path) -> None:
    qcfg, tensors = CASES[case]
    total = sum(math.prod(s) * SIZES[d] for d, s in tensors.values())
    spec = spec_from_config({**BASE, "quantization_config": qcfg})
    assert model_bytes(spec) == total  # from config.json alone
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "quantization_config": qcfg}))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    from vramplan.catalog import resolve_model

    spec2, _ = resolve_model(str(tmp_path))
    assert spec2.checkpoint is not None and spec2.checkpoint.total_bytes == total
    assert model_bytes(spec2) == total  # from the headers


def test_sharded_index_and_missing_shard(tmp_path: Path) -> None:
    tensors = checkpoint(gptq)
    names = list(tensors)
    half = len(names) // 2
    a = write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[:half]})
    b = write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {n: tensors[n] for n in names[half:]})
    wm = {n: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
          for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": a + b},
                                                                        "weight_map": wm}))
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "quantization_config": CASES["gptq"][0]}))
    from vramplan.catalog import resolve_model

    spec, _ = resolve_model(str(tmp_path))
    assert spec.checkpoint is not None and spec.checkpoint.exact and spec.checkpoint.files == 2
    assert model_bytes(spec) == a + b
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    spec, _ = resolve_model(str(tmp_path))
    assert spec.checkpoint is not None and not spec.checkpoint.exact and spec.checkpoint.total_bytes == a + b


def test_dense_checkpoint_loaded_in_fp32_is_doubled(tmp_path: Path) -> None:
    tensors = checkpoint(dense)
    total = write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    from vramplan.catalog import resolve_model
    from vramplan.workload import Precision

    spec, _ = resolve_model(str(tmp_path))
    assert model_bytes(spec) == total
    assert model_bytes(spec, precision=Precision.FP32) == 2 * total


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x00", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "does not fit"),
    (struct.pack("<Q", 5) + b"nope!", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_malformed_safetensors_one_line_errors(tmp_path: Path, blob: bytes, message: str) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(ConfigError, match=message):
        read_safetensors_header(p)


def test_header_sizes_are_checked(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ConfigError, match="needs 32"):
        read_safetensors_header(p)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ConfigError, match="outside the file"):
        read_safetensors_header(p)


def test_flag_schemes_and_group_size() -> None:
    spec = spec_from_config(BASE)
    per_linear = sum(k * n for k, n in LINEARS.values()) * L
    dense_rest = (2 * V * H + H + 2 * H * L) * 2
    assert model_bytes(spec, weights_quant=WeightsQuant.GPTQ_INT4) == dense_rest + L * sum(
        math.prod(s) * SIZES[d] for k, n in LINEARS.values() for d, s in gptq(k, n).values())
    g32 = model_bytes(spec, weights_quant=WeightsQuant.GPTQ_INT4, quant_group_size=32)
    assert g32 > model_bytes(spec, weights_quant=WeightsQuant.GPTQ_INT4)
    # nf4: transformers' default is no double quantization; --double-quant (and qlora) turn it on
    plain = model_bytes(spec, weights_quant=WeightsQuant.NF4)
    dq = model_bytes(spec, weights_quant=WeightsQuant.NF4, double_quant=True)
    assert plain - dq == L * sum(c(k * n, 64) * 3 - 4 * c(c(k * n, 64), 256) - 1024 for k, n in LINEARS.values())
    assert model_bytes(spec, weights_quant=WeightsQuant.FP8_BLOCK) == dense_rest + per_linear + L * sum(
        4 * c(n, 128) * c(k, 128) for k, n in LINEARS.values())


def test_mxfp4_quantizes_only_experts() -> None:
    moe = {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
           "vocab_size": 1000, "num_experts": 4, "num_experts_per_tok": 2,
           "quantization_config": {"quant_method": "mxfp4",
                                   "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}}
    spec = spec_from_config(moe)
    plain = spec_from_config({k: v for k, v in moe.items() if k != "quantization_config"})
    experts = 2 * 4 * 3 * 256 * 128  # layers x experts x (gate, up, down) x K x N
    mx = 2 * 4 * (2 * (128 * 256 // 32 * 17) + 256 * 128 // 32 * 17)  # 16 data + 1 scale byte per 32 weights
    assert model_bytes(plain) - model_bytes(spec) == experts * 2 - mx


def test_quant_errors() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        spec_from_config({**BASE, "quantization_config": {"quant_method": "magic"}})
    with pytest.raises(ConfigError, match="weight_block_size"):
        spec_from_config({**BASE, "quantization_config": {"quant_method": "fp8", "weight_block_size": [0]}})
    spec = spec_from_config({**BASE, "quantization_config": CASES["gptq"][0]})
    with pytest.raises(WorkloadError, match="already quantized"):
        model_states(spec, Workload(task=Task.INFER, weights_quant=WeightsQuant.NF4))
    with pytest.raises(VramplanError, match="training on gptq-int4"):
        Workload(method="lora", weights_quant=WeightsQuant.GPTQ_INT4)  # type: ignore[arg-type]
