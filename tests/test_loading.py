"""Loading every fixture through every preset that runs on this CPU, with an honest report."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel

import workbench as wb
from workbench.model import hardware

FAMILIES = ["gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
CPU_PRESETS = ["cpu", "bf16", "int8", "nf4", "offload"]


def _ids(session, n=12):
    return torch.arange(3, 3 + n).unsqueeze(0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_every_fixture_loads_through_every_cpu_preset(tiny_checkpoint, family, preset):
    path = tiny_checkpoint(family)
    s = wb.load(str(path), preset=preset)
    report = s.report
    assert report.preset == preset and report.requested_preset == preset
    with torch.no_grad():
        logits = s.model(_ids(s)).logits
    assert torch.isfinite(logits.float()).all()
    experts = report.dtypes_by_group["experts"]
    if preset in ("int8", "nf4"):
        wanted = "bnb-int8" if preset == "int8" else "bnb-nf4"
        assert report.actual_quantization == wanted and report.fallback is None
        # bitsandbytes only replaces nn.Linear: the fused 3-D expert tensors stay bf16, and we say so.
        # (Qwen2-MoE's always-on shared expert is a plain MLP of nn.Linear, so it is quantized.)
        routed = {n: p for n, p in s.model.named_parameters() if ".experts." in n}
        assert routed and all(p.dtype == torch.bfloat16 for p in routed.values())
        assert "bfloat16" in experts
        assert any("expert" in n.lower() and "bf16" in n for n in report.notes), report.notes
    else:
        assert report.actual_quantization is None and report.fallback is None
        assert set(experts) == {"float32" if preset == "cpu" else "bfloat16"}
    if preset == "offload":
        assert report.device_map, "offload must place modules with an accelerate device map"
    assert report.total_bytes > 0 and str(report) and report._repr_html_().startswith("<table>")


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_preset_gives_exactly_the_checkpoint(tiny_checkpoint, family):
    """Our loading path changes nothing: logits bit-identical to a direct from_pretrained."""
    path = tiny_checkpoint(family)
    s = wb.load(str(path), preset="cpu")
    direct = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=s.report.attn_implementation).eval()
    with torch.no_grad():
        assert torch.equal(s.model(_ids(s)).logits, direct(_ids(s)).logits)


def test_mxfp4_checkpoint_on_cpu_keeps_the_experts_packed_and_says_so(tiny_checkpoint):
    # No native kernels here: the workbench's packed path (tests/test_mxfp4_packed.py), not transformers' bf16 fallback
    s = wb.load(str(tiny_checkpoint("gpt_oss", mxfp4=True)), preset="mxfp4")
    r = s.report
    assert r.requested_quantization == "mxfp4" and r.actual_quantization == "mxfp4" and r.fallback is None
    assert r.mxfp4_path == "packed (workbench)" and any("native mxfp4 kernels are unavailable here" in n for n in r.notes)
    assert set(r.dtypes_by_group["experts"]) == {"uint8 (packed 4-bit)", "bfloat16"}  # blocks/scales, biases
    assert r.attn_implementation == "eager"  # gpt-oss sinks: SDPA unsupported
    assert "packed (workbench)" in str(r)


def test_mxfp4_checkpoint_under_bf16_preset_equals_transformers_dequantizer(tiny_checkpoint):
    path = tiny_checkpoint("gpt_oss", mxfp4=True)
    s = wb.load(str(path), preset="bf16")
    assert s.report.fallback is None
    direct = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for (name, a), (_, b) in zip(s.model.named_parameters(), direct.named_parameters()):
        assert torch.equal(a, b), name


def test_auto_on_this_cpu_picks_cpu_preset_and_says_why(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("mixtral")), preset="auto")
    assert s.report.requested_preset == "auto" and s.report.preset == "cpu"
    assert s.report.auto_reason
    assert "auto" in str(s.report)


# ---- bad input: a clear error that says what to do, before any download --------------------------
def test_unknown_preset_lists_valid_ones(tiny_checkpoint):
    with pytest.raises(wb.PresetError) as e:
        wb.load(str(tiny_checkpoint("olmoe")), preset="fp8")
    for name in wb.PRESET_NAMES:
        assert name in str(e.value)


def test_mxfp4_preset_on_a_non_gpt_oss_model_is_refused_with_alternatives(tiny_checkpoint):
    with pytest.raises(wb.PresetError) as e:
        wb.load(str(tiny_checkpoint("mixtral")), preset="mxfp4")
    assert "bf16" in str(e.value)


def test_bnb_preset_on_the_mxfp4_checkpoint_is_refused(tiny_checkpoint):
    with pytest.raises(wb.PresetError) as e:
        wb.load(str(tiny_checkpoint("gpt_oss", mxfp4=True)), preset="int8")
    message = str(e.value)
    assert "mxfp4" in message and "bf16" in message


def test_missing_model_offline_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(wb.ModelNotFoundError) as e:
        wb.load("someone/not-a-cached-model", preset="cpu")
    assert "download" in str(e.value).lower()


def test_not_a_causal_lm(tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(wb.NotACausalLMError):
        wb.load(str(tmp_path), preset="cpu")


def test_plan_that_does_not_fit_is_refused_before_loading(tiny_checkpoint, monkeypatch):
    tiny = [hardware.Device("cpu", "tiny RAM", 10_000, 10_000), hardware.Device("disk", "disk", 10**12, 10**12)]
    monkeypatch.setattr(hardware, "devices", lambda *a, **k: tiny)
    with pytest.raises(wb.DoesNotFitError) as e:
        wb.load(str(tiny_checkpoint("qwen3_moe")), preset="cpu")
    assert "offload" in str(e.value)


# ---- the real small model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_answers_paris_greedily(smollm2_session):
    g = smollm2_session.chat("What is the capital of France?", temperature=0, max_new_tokens=24)
    assert "Paris" in g.text
    assert g.channels["final"] == g.text
    assert len(g.logprobs) == len(g.token_ids)


@pytest.mark.slow
def test_gguf_file_loads_directly():
    from workbench import fixtures

    folder, name = fixtures.smollm2_gguf()
    s = wb.load(f"{folder}/{name}", preset="cpu")
    g = s.chat("What is the capital of France?", temperature=0, max_new_tokens=12)
    assert "Paris" in g.text


@pytest.mark.slow
def test_prompt_over_the_context_is_refused(smollm2_session):
    too_long = " ".join(["word"] * (smollm2_session.model.config.max_position_embeddings + 10))
    with pytest.raises(wb.ContextLengthError):
        smollm2_session.chat(too_long, max_new_tokens=4)


@pytest.mark.slow
def test_invalid_sampling_parameters_are_refused(smollm2_session):
    with pytest.raises(wb.SamplingError):
        smollm2_session.chat("hi", temperature=-1)
    with pytest.raises(wb.SamplingError):
        smollm2_session.chat("hi", top_p=1.5)
    with pytest.raises(wb.SamplingError):
        smollm2_session.chat("hi", max_new_tokens=0)


@pytest.mark.slow
def test_second_stream_while_one_runs_is_refused(smollm2_session):
    run = smollm2_session.stream("Tell me a story", max_new_tokens=64)
    try:
        with pytest.raises(wb.BusyError):
            smollm2_session.stream("hi")
    finally:
        run.stop()
        run.result()
    smollm2_session.chat("hi", max_new_tokens=2)  # usable again


def test_native_mxfp4_modules_are_recognised_and_counted():
    """On a GPU, transformers swaps the packed Parameters for triton tensors: the report must still see them."""
    from types import SimpleNamespace

    from workbench.fixtures.checkpoints import tiny_config
    from workbench.model.adapters import adapter_for
    from workbench.model.report import actual_quantization, measure

    class Mxfp4GptOssExperts(torch.nn.Module):  # the shape of transformers' module after swizzling
        def __init__(self):
            super().__init__()
            self.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(4, 8))
            self.gate_up_proj = SimpleNamespace(storage=SimpleNamespace(data=torch.zeros(4, 8, 16, dtype=torch.uint8)))
            self.gate_up_proj_precision_config = SimpleNamespace(weight_scale=torch.zeros(4, 8, dtype=torch.uint8))

    model = torch.nn.Module()
    model.experts = Mxfp4GptOssExperts()
    assert actual_quantization(model) == "mxfp4"
    adapter, _ = adapter_for(tiny_config("gpt_oss"))
    by_group, by_device = measure(model, adapter)
    assert by_group["experts"]["mxfp4 (native, swizzled)"] == 4 * 8 * 16 + 4 * 8


# ---- routers and gates are never quantized unless asked -------------------------------------------
def _router_params(s):
    return {n: p for n, p in s.model.named_parameters() if s.adapter.group_of(n) == "router"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_bnb_presets_keep_every_router_and_gate_in_bf16(tiny_checkpoint, family, preset):
    s = wb.load(str(tiny_checkpoint(family)), preset=preset)
    routers = _router_params(s)
    assert routers, "every fixture family has a router"
    assert all(p.dtype == torch.bfloat16 for p in routers.values()), {n: p.dtype for n, p in routers.items()}
    assert set(s.report.dtypes_by_group["router"]) == {"bfloat16"}
    assert any(n.startswith("router kept in bf16") for n in s.report.notes), s.report.notes
    if family == "qwen2_moe":  # nn.Linear(hidden, 1): bitsandbytes' CPU nf4 kernel cannot even take it
        gate = dict(s.model.named_modules())["model.layers.0.mlp.shared_expert_gate"]
        assert type(gate) is torch.nn.Linear
    # Everything the router decides is unchanged by the quantizer: the same routers as the bf16 load.
    reference = _router_params(wb.load(str(tiny_checkpoint(family)), preset="bf16"))
    assert all(torch.equal(p, reference[n]) for n, p in routers.items())


def test_quantize_router_opts_in_to_bitsandbytes_default(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("qwen2_moe")), preset="int8", quantize_router=True)
    gate = dict(s.model.named_modules())["model.layers.0.mlp.shared_expert_gate"]
    assert type(gate).__name__ == "Linear8bitLt"
    assert any("quantize_router=True" in n for n in s.report.notes)


# ---- planning needs nothing that loading needs ------------------------------------------------------
def test_nf4_plans_without_bitsandbytes_but_does_not_load(tiny_checkpoint, monkeypatch):
    path = str(tiny_checkpoint("olmoe"))
    with_bnb = wb.plan(path, preset="nf4")
    monkeypatch.setattr(hardware, "bitsandbytes_available", lambda: False)
    p = wb.plan(path, preset="nf4")
    assert not p.loadable_here and "pip install 'bitsandbytes" in p.not_loadable_reason
    assert p.total_bytes == with_bnb.total_bytes and "attention" in p.quantized_groups
    assert "NOT LOADABLE HERE" in str(p) and "not loadable here" in p._repr_html_()
    table = wb.plan_all(path)
    assert not table["nf4"].loadable_here and "not loadable here" in str(table)
    with pytest.raises(wb.PresetError, match="bitsandbytes"):
        wb.load(path, preset="nf4")
    assert wb.plan(path, preset="auto").preset in ("cpu", "bf16")  # auto never picks what cannot load


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_mxfp4_on_bf16_weights_without_native_kernels_plans_for_the_gpu_you_will_rent(tiny_checkpoint):
    path = str(tiny_checkpoint("gpt_oss"))  # bf16 weights; no CUDA GPU on this machine
    p = wb.plan(path, preset="mxfp4")
    bf16 = wb.plan(path, preset="bf16")
    assert not p.loadable_here and "native" in p.not_loadable_reason
    assert p.quantized_groups == ("experts",) and p.total_bytes < bf16.total_bytes and p.fallback is None
    with pytest.raises(wb.PresetError, match="quantize at load"):
        wb.load(path, preset="mxfp4")


def test_nf4_keeps_linears_it_cannot_quantize_and_says_so(tmp_path):
    """A Linear whose input width is not a multiple of 64 (a Qwen2-MoE shared expert of width 96) fails inside
    bitsandbytes' CPU NF4 kernel at the first forward; the plan and the load keep it in bf16 and say so."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from workbench import fixtures

    config = Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=300)
    torch.manual_seed(0)
    Qwen2MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(fixtures.tiny_checkpoint("qwen2_moe")).save_pretrained(tmp_path)
    plan = wb.plan(str(tmp_path), preset="nf4")
    assert any("not a multiple of 64 stay in bfloat16" in n and "shared_expert.down_proj" in n for n in plan.notes)
    s = wb.load(str(tmp_path), preset="nf4")
    down = dict(s.model.named_modules())["model.layers.0.mlp.shared_expert.down_proj"]
    assert type(down) is torch.nn.Linear and down.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = s.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()
