"""The built-in model catalog: data schema, exact counts, lookup and resolution."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import make_workload
from vramplan.catalog import CatalogEntry, get_model, list_models, resolve_model
from vramplan.errors import ConfigError, UnknownNameError
from vramplan.hfconfig import SUPPORTED_MODEL_TYPES
from vramplan.memory import model_states
from vramplan.multimodal import MULTIMODAL_TYPES, tower_parameters
from vramplan.params import count_params

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_CONFIG = REPO / "tests" / "data" / "calibration" / "configs" / "llama-3.1-8b.json"


def _raw() -> dict[str, Any]:
    text = resources.files("vramplan").joinpath("data/models.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


RECORDS: list[dict[str, Any]] = _raw()["models"]
FIELDS = {"name", "hf_id", "aliases", "params", "params_source", "source", "retrieved", "config"}
OPTIONAL = {"variants"}  # Hugging Face id -> where its config.json was read, what was compared, when
HF_ID_RE = re.compile(r"[\w.\-]+/[\w.\-]+")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")


# ---- the data file ------------------------------------------------------------------------

def test_schema_version_and_size() -> None:
    doc = _raw()
    assert doc["schema"] == 1
    assert len(RECORDS) >= 48
    assert len(list_models()) == len(RECORDS) >= 40


@pytest.mark.parametrize("record", RECORDS, ids=[r["name"] for r in RECORDS])
def test_record_schema(record: dict[str, Any]) -> None:
    assert FIELDS <= set(record) <= FIELDS | OPTIONAL
    for hf_id, note in record.get("variants", {}).items():  # each one read, compared and dated
        assert HF_ID_RE.fullmatch(hf_id) and hf_id != record["hf_id"], hf_id
        assert isinstance(note, str) and "config" in note and re.search(r"\d{4}-\d{2}-\d{2}", note), hf_id
    name = record["name"]
    assert isinstance(name, str) and NAME_RE.match(name), name
    assert isinstance(record["hf_id"], str) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", record["hf_id"])
    assert isinstance(record["aliases"], list)
    for alias in record["aliases"]:
        assert isinstance(alias, str) and NAME_RE.match(alias) and alias != name, alias
    params = record["params"]
    assert type(params) is int and params > 10_000_000
    assert isinstance(record["params_source"], str) and "transformers" in record["params_source"]
    source = record["source"]
    assert source == f"https://huggingface.co/{record['hf_id']}/blob/main/config.json"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["retrieved"])
    datetime.date.fromisoformat(record["retrieved"])
    config = record["config"]
    assert isinstance(config, dict)
    if config["model_type"] in MULTIMODAL_TYPES:  # a vision-language model: its published config, both towers
        assert "vision_config" in config and "torch_dtype" not in config
        return
    assert config["model_type"] in SUPPORTED_MODEL_TYPES
    assert not {"id2label", "label2id", "torch_dtype", "text_config", "vision_config"} & set(config)


def test_names_unique() -> None:
    dupes = [n for n, c in Counter(r["name"] for r in RECORDS).items() if c > 1]
    assert not dupes


def test_aliases_unique_across_records_and_names() -> None:
    names = {r["name"] for r in RECORDS}
    aliases = [a for r in RECORDS for a in r["aliases"]]
    assert not [a for a, c in Counter(aliases).items() if c > 1]
    assert not names & set(aliases)


def test_every_lookup_key_finds_one_model() -> None:
    owner: dict[str, str] = {}
    for r in RECORDS:
        ids = {r["hf_id"], *r.get("variants", {})}
        for key in {r["name"], *r["aliases"], *ids, *(i.rpartition("/")[2] for i in ids)}:
            assert owner.setdefault(key.lower(), r["name"]) == r["name"], key


def test_gemma3_multimodal_entries_say_vision_is_excluded() -> None:
    for name in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b"):
        record = next(r for r in RECORDS if r["name"] == name)
        assert record["config"]["model_type"] == "gemma3_text"
        assert "vision tower" in record["params_source"] and "excluded" in record["params_source"]


FAMILIES = [
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-j-6b", "gpt-neox-20b",
    "pythia-160m", "pythia-1.4b", "pythia-6.9b", "pythia-12b",
    "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b",
    "bloom-560m", "bloom-7b1", "bloom-176b",
    "llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
    "llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b",
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b",
    "mistral-7b", "mistral-7b-v0.3", "mixtral-8x7b", "mixtral-8x22b",
    "falcon-7b", "falcon-40b", "falcon-180b",
    "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
    "qwen3-0.6b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b",
    "qwen1.5-moe-a2.7b",
    "gemma-2b", "gemma-7b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b",
    "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b",
    "phi-3-mini", "phi-3-medium", "phi-4",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_present(name: str) -> None:
    assert get_model(name).name == name


# ---- exact counts -------------------------------------------------------------------------

@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_exact_parameter_count(entry: CatalogEntry) -> None:
    mm = entry.spec.multimodal
    tower = tower_parameters(mm.tower) if mm is not None else 0  # a vision-language model's tower and projector
    assert count_params(entry.spec).total + tower == entry.params


@pytest.mark.parametrize(("name", "published"), [
    ("gpt2", 124_439_808),
    ("llama-2-7b", 6_738_415_616),
    ("llama-3.1-8b", 8_030_261_248),
    ("mistral-7b", 7_241_732_096),
    ("mixtral-8x7b", 46_702_792_704),
    ("qwen2.5-7b", 7_615_616_512),
    ("gemma-2-9b", 9_241_705_984),
    ("phi-3-mini", 3_821_079_552),
    # the Hub's safetensors totals (api/models/<repo>?expand[]=safetensors, as a public registry records them)
    ("phi-4-mini", 3_836_021_760),
    ("nemotron-nano-9b-v2", 8_888_227_328),
])
def test_published_figures(name: str, published: int) -> None:
    assert get_model(name).params == published


# The 2025-26 additions (issue 11, item 6): exact counts as transformers 5.24.0 builds each published config on the
# meta device (sum of p.numel(); benchmarks/verify_catalog_counts.py --only NAME recomputes them). Pinned here so that
# an edit of a config or of the counting that moves a total fails; the slow test re-derives them from transformers.
ADDED_2025_26 = {
    "olmo-3-7b": 7_298_011_136,
    "olmo-3-32b": 32_233_522_176,
    "granite-3.3-8b": 8_170_864_640,
    "granite-3.3-2b": 2_533_539_840,
    "ernie-4.5-0.3b": 360_748_032,
    "ernie-4.5-21b-a3b": 21_825_437_888,
    "ernie-4.5-300b-a47b": 299_484_163_264,
    "mistral-small-24b": 23_572_403_200,
    "falcon-h1-0.5b": 521_411_104,
    "qwen3.5-35b-a3b": 34_660_610_688,
    "deepseek-v3.2": 671_877_929_216,
    "deepseek-v4-flash-base": 284_332_230_231,
    "deepseek-v4-flash": 284_332_230_231,
    "granite-4.0-h-350m": 340_332_224,
    "kimi-linear-48b-a3b": 49_122_675_072,
    "gemma-4-31b": 30_697_345_280,
    "glm-5": 743_911_199_232,
    "qwen3-coder-480b-a35b": 480_154_875_392,
    # instruct checkpoints whose config differs from their base entry's in a field that moves memory
    "qwen2.5-7b-instruct": 7_615_616_512,
    "mistral-small-3.1-24b": 24_011_361_280,  # vision-language: Pixtral tower + projector + the language model
    "glm-4.6": 352_797_814_784,  # GLM-4.5's shapes, 202,752 positions
    "qwen3-235b-a22b-instruct-2507": 235_093_634_560,  # the base's shapes, 262,144 positions
    "qwen2.5-72b-instruct": 72_706_203_648,  # 32,768 positions, the base 131,072
    "qwen2.5-1.5b-instruct": 1_543_714_304,  # 32,768 positions, the base 131,072
    "qwen3-30b-a3b-thinking-2507": 30_532_122_624,  # 262,144 positions, the base 40,960
    "qwen3-30b-a3b-thinking-2507-fp8": 30_532_122_624,  # the same modules; its FP8 storage: the test below
    # 2026-12-04, counted on transformers 5.25.0's meta device
    "phi-4-mini": 3_836_021_760,  # tied embeddings: the 200,064-token embedding counted once
    "qwen3-coder-30b-a3b": 30_532_122_624,  # Qwen3-30B-A3B's modules, 262,144 positions
    "kimi-k2-0905": 1_026_408_209_408,  # kimi-k2's modules, 262,144 positions
    "kimi-k2-thinking": 1_026_408_209_408,  # kimi-k2's modules, 262,144 positions; its INT4 experts left out
    "nemotron-nano-9b-v2": 8_888_227_328,  # Mamba-2 / ReLU² MLP / attention blocks; the Hub's safetensors total
    "nemotron-nano-12b-v2": 12_310_001_152,
    "devstral-small": 23_572_403_200,  # Mistral-Small-3.1's language model, its Pixtral tower removed
}


def _total(entry: CatalogEntry) -> int:
    """vramplan's count of the whole model: a vision-language model's tower and projector too."""
    mm = entry.spec.multimodal
    return count_params(entry.spec).total + (tower_parameters(mm.tower) if mm is not None else 0)


@pytest.mark.parametrize(("name", "count"), sorted(ADDED_2025_26.items()))
def test_added_2025_26_counts(name: str, count: int) -> None:
    entry = get_model(name)
    assert entry.params == count
    assert _total(entry) == count


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADDED_2025_26))
def test_added_2025_26_counts_match_the_meta_device(name: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = get_model(name).config_dict()
    model_type = config.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    vlm = model_type in MULTIMODAL_TYPES  # the image-text class: tower + projector + language model
    auto = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == ADDED_2025_26[name]


def test_fp8_checkpoint_holds_its_quantized_bytes() -> None:
    """Qwen3-30B-A3B-Thinking-2507-FP8 as published (fp8 e4m3 in 128 x 128 blocks; lm_head, routers and norms kept):
    the weights and scales transformers 5.24's FP8 quantizer makes of the meta-device model, 31,174,545,920 bytes
    with its two rotary inv_freq buffers (512 B) that vramplan counts elsewhere; the checkpoint's safetensors hold
    29.03 GiB (its scales in bf16). The bf16 checkpoint of the same model: 2 bytes a parameter, no scales."""
    w = make_workload(task="infer", batch_size=1, seq_len=64)
    fp8 = model_states(get_model("qwen3-30b-a3b-thinking-2507-fp8").spec, w)
    assert fp8.weights + fp8.quant_constants == 31_174_545_408
    bf16 = model_states(get_model("qwen3-30b-a3b-thinking-2507").spec, w)
    assert bf16.quant_constants == 0 and bf16.weights == 2 * get_model("qwen3-30b-a3b-thinking-2507").params


@pytest.mark.parametrize(("name", "base"), [
    ("kimi-k2-0905", "kimi-k2"), ("kimi-k2-thinking", "kimi-k2"),
    ("qwen3-coder-30b-a3b", "qwen3-30b-a3b-thinking-2507"),
])
def test_long_context_entries_differ_from_their_base_only_where_stated(name: str, base: str) -> None:
    """An entry of its own for a checkpoint with another position limit (or an unused field): every other field
    that builds a module is its base entry's, so the counts agree and the limit does not."""
    new, old = get_model(name), get_model(base)
    assert new.params == old.params
    assert new.spec.max_position_embeddings == 262_144
    moved = {k for k in {*new.config, *old.config} if new.config.get(k) != old.config.get(k)}
    assert moved <= {"max_position_embeddings", "intermediate_size", "router_aux_loss_coef", "rope_scaling",
                     "max_window_layers", "attention_dropout", "attention_bias"}, moved


def test_phi4_mini_ties_its_head_and_rotates_three_quarters() -> None:
    spec = get_model("phi-4-mini").spec
    assert spec.tie_word_embeddings and spec.vocab_size == 200_064
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (24, 8, 128)
    untied = count_params(dataclasses.replace(spec, tie_word_embeddings=False)).total
    assert untied - get_model("phi-4-mini").params == 200_064 * 3072


@pytest.mark.parametrize(("name", "mamba", "mlp", "attention"), [
    ("nemotron-nano-9b-v2", 27, 25, 4), ("nemotron-nano-12b-v2", 28, 28, 6),
])
def test_nemotron_nano_v2_block_mix(name: str, mamba: int, mlp: int, attention: int) -> None:
    """Nemotron-H blocks hold one sublayer each: the pattern's M, - and * become Mamba-2, MLP-only and attention."""
    spec = get_model(name).spec
    assert Counter(spec.mixers) == {"mamba2": mamba, "none": mlp, "attention": attention}
    assert spec.ssm is not None and (spec.ssm.n_heads, spec.ssm.head_dim, spec.ssm.n_groups) == (128, 80, 8)


def test_devstral_is_mistral_small_31_without_its_vision_tower() -> None:
    """Devstral Small (card: fine-tuned from Mistral-Small-3.1, vision encoder removed): the vision-language entry's
    total less its Pixtral tower and projector, and the same attention and vocabulary."""
    vlm, text = get_model("mistral-small-3.1-24b"), get_model("devstral-small")
    mm = vlm.spec.multimodal
    assert mm is not None and text.spec.multimodal is None
    assert text.params == vlm.params - tower_parameters(mm.tower)
    for attr in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                 "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(text.spec, attr) == getattr(vlm.spec, attr), attr


def test_moe_and_sliding_specs() -> None:
    assert get_model("mixtral-8x7b").spec.num_experts == 8
    assert get_model("qwen3-30b-a3b").spec.num_moe_layers == 48
    assert get_model("qwen1.5-moe-a2.7b").spec.shared_expert_intermediate_size == 5632
    assert get_model("mistral-7b").spec.sliding_window == 4096
    assert get_model("mistral-7b-v0.3").spec.sliding_window is None
    assert get_model("mistral-7b-v0.3").spec.vocab_size == 32768
    assert get_model("gemma-2-9b").spec.num_sliding_layers == 21


# ---- the API ------------------------------------------------------------------------------

def test_list_models_sorted_and_cached() -> None:
    models = list_models()
    assert isinstance(models, tuple)
    assert [m.name for m in models] == sorted(m.name for m in models)
    assert list_models() is models


def test_entry_is_frozen_and_read_only() -> None:
    entry = get_model("llama-3.1-8b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        entry.config["hidden_size"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        entry.config["rope_scaling"]["factor"] = 1.0
    assert entry.spec is entry.spec  # cached
    assert entry.spec.name == "llama-3.1-8b"
    assert hash(entry) == hash(get_model("llama-3.1-8b"))


@pytest.mark.parametrize(("query", "name"), [
    ("llama-3.1-8b", "llama-3.1-8b"),
    ("LLAMA-3.1-8B", "llama-3.1-8b"),
    ("  llama3.1-8b ", "llama-3.1-8b"),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
    ("Llama-3.1-8B", "llama-3.1-8b"),
    ("gpt2-small", "gpt2"),
    ("openai-community/gpt2", "gpt2"),
    ("llama-33b", "llama-30b"),
    ("bigscience/bloom", "bloom-176b"),
    ("Mistral-7B-v0.1", "mistral-7b"),
    ("google/gemma-3-4b-pt", "gemma-3-4b"),
    ("deepseek-ai/DeepSeek-R1", "deepseek-v3"),  # variants: checkpoints whose config.json was read and compared
    ("DeepSeek-V3.1", "deepseek-v3"),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama-4-scout-17b-16e"),
    ("meta-llama/llama-3.1-8b-instruct", "llama-3.1-8b"),
    ("Qwen/Qwen3-Coder-480B-A35B-Instruct", "qwen3-coder-480b-a35b"),
    ("Qwen/Qwen2.5-32B-Instruct", "qwen2.5-32b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),  # 32,768 positions, the base 131,072: an entry of its own
    ("mistralai/Mistral-Small-3.2-24B-Instruct-2506", "mistral-small-3.1-24b"),
    ("zai-org/GLM-4.6", "glm-4.6"),
    ("Qwen/Qwen3-235B-A22B-Instruct-2507", "qwen3-235b-a22b-instruct-2507"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("Qwen/QwQ-32B", "qwen2.5-32b"),
    ("Qwen/Qwen2.5-3B-Instruct", "qwen2.5-3b"),
    ("Qwen/Qwen3-30B-A3B-Thinking-2507", "qwen3-30b-a3b-thinking-2507"),
    ("Qwen/Qwen3-30B-A3B-Thinking-2507-FP8", "qwen3-30b-a3b-thinking-2507-fp8"),
    # 2026-12-04: the names people run these under
    ("deepseek-ai/DeepSeek-R1-0528", "deepseek-v3"),
    ("DeepSeek-V3.1-Terminus", "deepseek-v3"),
    ("microsoft/Phi-4-mini-instruct", "phi-4-mini"),
    ("Phi-4-mini-instruct", "phi-4-mini"),
    ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3-coder-30b-a3b"),
    ("moonshotai/Kimi-K2-Instruct-0905", "kimi-k2-0905"),
    ("Kimi-K2-Instruct-0905", "kimi-k2-0905"),
    ("moonshotai/Kimi-K2-Thinking", "kimi-k2-thinking"),
    ("nvidia/NVIDIA-Nemotron-Nano-9B-v2", "nemotron-nano-9b-v2"),
    ("NVIDIA-Nemotron-Nano-9B-v2-Base", "nemotron-nano-9b-v2"),
    ("nvidia/NVIDIA-Nemotron-Nano-12B-v2", "nemotron-nano-12b-v2"),
    ("nemotron-nano-12b", "nemotron-nano-12b-v2"),
    ("mistralai/Devstral-Small-2507", "devstral-small"),
    ("Devstral-Small-2505", "devstral-small"),
    ("deepseek-ai/DeepSeek-V3.2-Exp", "deepseek-v3.2"),
    ("DeepSeek-V3.2-Speciale", "deepseek-v3.2"),
])
def test_lookup_by_name_alias_and_hf_id(query: str, name: str) -> None:
    assert get_model(query).name == name


def test_near_miss_suggestions() -> None:
    with pytest.raises(UnknownNameError) as err:
        get_model("llama-3.1-7b")
    msg = str(err.value)
    assert "did you mean" in msg and "llama-3.1-8b" in msg
    assert msg.startswith("unknown model 'llama-3.1-7b'")
    assert "vramplan models" in msg and "\n" not in msg
    with pytest.raises(UnknownNameError, match=r"did you mean .*qwen3-8b"):
        get_model("qwen3-7b")
    with pytest.raises(UnknownNameError, match="mistral-7b"):
        get_model("mistrel-7b")


def test_unknown_model_without_close_match() -> None:
    with pytest.raises(UnknownNameError) as err:
        get_model("zzzz-unheard-of")
    assert "did you mean" not in str(err.value)
    assert "config.json" in str(err.value)


def test_resolve_model_by_name() -> None:
    spec, entry = resolve_model("Qwen/Qwen3-8B")
    assert entry is not None and entry.name == "qwen3-8b"
    assert spec is entry.spec


def test_resolve_model_by_path() -> None:
    if not CALIBRATION_CONFIG.is_file():
        pytest.skip(f"{CALIBRATION_CONFIG} not in this checkout")
    spec, entry = resolve_model(str(CALIBRATION_CONFIG))
    assert entry is None
    catalog = get_model("llama-3.1-8b")
    assert count_params(spec).total == catalog.params == 8_030_261_248
    for attr in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(spec, attr) == getattr(catalog.spec, attr), attr


def test_resolve_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(get_model("gpt2").config)), encoding="utf-8")
    spec, entry = resolve_model(str(tmp_path))
    assert entry is None
    assert count_params(spec).total == get_model("gpt2").params


def test_resolve_missing_json_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        resolve_model(str(tmp_path / "nope.json"))
    with pytest.raises(UnknownNameError):
        resolve_model("not-a-model-or-path")
