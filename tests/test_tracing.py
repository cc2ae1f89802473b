"""Traces are exact and cheap: capture changes no logit, routing equals what the router returned, attention
equals eager output_attentions, files round-trip, and nothing is left behind after an exception."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from workbench import fixtures
from workbench.errors import (
    CaptureBudgetError,
    CaptureError,
    TraceFileError,
    TraceModelMismatchError,
)
from workbench.inspect.budget import parse_budget as parse_bytes
from workbench.inspect.budget import trace_bytes
from workbench.inspect.capture import capture, trace
from workbench.inspect.trace import Trace
from workbench.model.adapters import adapter_for

COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=300, initializer_range=0.1, tie_word_embeddings=False)
CONFIGS = {
    "gpt_oss": lambda: GptOssConfig(**COMMON, num_local_experts=8, num_experts_per_tok=4, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"] * 2),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=32, norm_topk_prob=False,
                                        decoder_sparse_step=2),  # layers 1 and 3 routed, 0 and 2 dense
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2),
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral_sliding": lambda: MistralConfig(**COMMON, sliding_window=4),
}
CLASSES = {"gpt_oss": GptOssForCausalLM, "mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM,
           "qwen3_moe": Qwen3MoeForCausalLM, "olmoe": OlmoeForCausalLM, "llama": LlamaForCausalLM,
           "mistral_sliding": MistralForCausalLM}
FAMILIES = ["gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_cache: dict = {}


def tiny(family: str, dtype=torch.float32, attn: str = "eager"):
    """A tiny model of `family` (cached): the on-disk real-layout fixture for the MoE families, loaded through
    from_pretrained; llama/mistral built in memory with weights ~N(0, 0.1) so attention is not flat."""
    key = (family, dtype, attn)
    if key not in _cache and family in fixtures.FAMILIES:
        path = fixtures.tiny_checkpoint(family)
        _cache[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()
    if key not in _cache:
        torch.manual_seed(0)
        config = CONFIGS[family]()
        config._attn_implementation = attn
        model = CLASSES[family](config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 1 and p.dtype.is_floating_point and not (p == 1).all():  # leave norms at 1
                    p.normal_(0, 0.1)
        _cache[key] = model.to(dtype)
    return _cache[key]


def ids(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (1, n), generator=g)


def all_hooks(model):
    """Every forward (pre-)hook on the model. transformers installs its own output-capturing hooks the first time
    output_attentions is used, so tests compare snapshots rather than expect none."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hooks in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hooks}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---- capture changes nothing ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bit_identical_with_capture(family, dtype):
    model = tiny(family, DTYPES[dtype], attn="eager" if family == "gpt_oss" else "sdpa")  # gpt-oss has no sdpa
    adapter, _ = adapter_for(model.config)
    x = ids()
    before, hooks = logits(model, x), all_hooks(model)
    what = ["attention", "residuals"] + (["routing"] if adapter.is_moe else [])
    with capture(model, adapter, what=what) as cap:
        during = logits(model, x)
    after = logits(model, x)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all_hooks(model) == hooks
    t = cap.trace()
    assert t.layers == list(range(model.config.num_hidden_layers))
    if adapter.is_moe:
        assert t.routing.layers == adapter.moe_layers(model)


# ---- routing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_routing_equals_router(family, dtype):
    model = tiny(family, DTYPES[dtype])
    adapter, _ = adapter_for(model.config)
    seen, inputs, handles = {}, {}, []
    for layer in adapter.moe_layers(model):
        mlp = adapter.mlp_module(model, layer)
        router = getattr(mlp, adapter.router)
        handles.append(router.register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(layer, out)))
        handles.append(mlp.register_forward_pre_hook(lambda m, a, layer=layer: inputs.__setitem__(layer, a[0])))
    try:
        t = trace(model, None, adapter, ids()[0].tolist(), what=["routing"])
    finally:
        for h in handles:
            h.remove()
    assert t.routing.layers == sorted(seen)
    for row, layer in enumerate(t.routing.layers):
        router_logits, scores, indices = seen[layer]
        assert torch.equal(t.routing.indices[row], indices)
        assert torch.equal(t.routing.weights[row], scores)  # same dtype too: the weights the model applied
        assert torch.equal(t.routing.logits[row], router_logits.float())
        # independent recomputation: the router module's own forward on the MLP input
        router = getattr(adapter.mlp_module(model, layer), adapter.router)
        with torch.no_grad():
            again = router(inputs[layer].reshape(-1, inputs[layer].shape[-1]))
        assert torch.equal(t.routing.indices[row], again[2]) and torch.equal(t.routing.weights[row], again[1])
    assert t.routing.logits.dtype == torch.float32
    k = adapter.top_k(model.config)
    assert t.routing.indices.shape == (len(t.routing.layers), 24, k)


# ---- attention -------------------------------------------------------------------------------------------
def eager_attentions(model, x):
    with torch.no_grad():
        return model(x, output_attentions=True).attentions


@pytest.mark.parametrize("family", FAMILIES + ["mistral_sliding"])
def test_attention_equals_eager_fp32(family):
    model = tiny(family)
    adapter, _ = adapter_for(model.config)
    x = ids(20)
    t = trace(model, None, adapter, x, what=["attention"], dtype=torch.float32)
    ref = eager_attentions(model, x)
    layers = range(model.config.num_hidden_layers)
    for layer in layers:
        assert torch.equal(t.attention(layer), ref[layer][0].float()), layer
        for head in range(4):
            assert torch.equal(t.attention(layer, head), ref[layer][0, head].float())
    # the default storage for a float32 model is float16: stated tolerance 2e-3 (measured <= 3.2e-4)
    t16 = trace(model, None, adapter, x, what=["attention"])
    assert t16._t["q.0"].dtype == torch.float16
    for layer in layers:
        assert (t16.attention(layer) - ref[layer][0]).abs().max() < 2e-3


@pytest.mark.parametrize("family", ["gpt_oss", "llama", "mistral_sliding"])
def test_attention_bf16_model(family):
    """bf16 q/k are stored as they are (no loss); patterns are computed in float32, eager in bf16."""
    model = tiny(family, torch.bfloat16)
    adapter, _ = adapter_for(model.config)
    x = ids(20)
    t = trace(model, None, adapter, x, what=["attention"])
    assert t._t["q.0"].dtype == torch.bfloat16
    ref = eager_attentions(model, x)
    for layer in range(4):  # measured <= 3.9e-3, half a bf16 step at 1.0
        assert (t.attention(layer) - ref[layer][0].float()).abs().max() < 1.6e-2  # bf16 eps is 7.8e-3


def test_attention_recorded_under_sdpa():
    """The model runs its own sdpa; patterns from the q/k it computed equal eager's (layer 0 bitwise; later
    layers see residual streams that sdpa and eager round differently, 2e-7)."""
    eager, sdpa = tiny("llama"), tiny("llama", attn="sdpa")
    adapter, _ = adapter_for(sdpa.config)
    x = ids(20)
    t = trace(sdpa, None, adapter, x, what=["attention"], dtype=torch.float32)
    assert sdpa.config._attn_implementation == "sdpa"
    ref = eager_attentions(eager, x)
    assert torch.equal(t.attention(0), ref[0][0])
    assert all((t.attention(layer) - ref[layer][0]).abs().max() < 1e-6 for layer in range(4))


def test_gpt_oss_sinks_windows_and_bands():
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    n = 20
    t = trace(model, None, adapter, ids(n), what=["attention"], dtype=torch.float32)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    assert t.sink_mass.shape == (4, 4, n) and (t.sink_mass > 0).all()
    for layer in range(4):
        a = t.attention(layer)
        total = a.sum(-1) + t.sink_mass[t.layers.index(layer)]
        assert (total - 1).abs().max() < 1e-6
        visible = (j <= i) & ((j > i - 4) if layer % 2 == 0 else True)
        assert (a[:, ~visible] == 0).all() and (a[:, visible] > 0).all()
    band = t.attention(0, 2, band=True)
    dense = t.attention(0, 2)
    assert band.shape == (n, 4)
    for q in range(n):
        for w in range(4):
            key = q - 3 + w
            assert band[q, w] == (dense[q, key] if key >= 0 else 0)
    with pytest.raises(CaptureError, match="full attention"):
        t.attention(1, band=True)
    dense_model = tiny("llama")
    t2 = trace(dense_model, None, adapter_for(dense_model.config)[0], ids(8), what=["attention"])
    assert torch.equal(t2.sink_mass, torch.zeros(4, 4, 8))


def test_layers_and_heads_selection_and_errors():
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    x = ids(16)
    full = trace(model, None, adapter, x, what=["attention", "routing"], dtype=torch.float32)
    part = trace(model, None, adapter, x, what=["attention", "routing"], layers=[2, -1], heads=[3],
                 dtype=torch.float32)
    assert part.layers == [2, 3] and part.heads == [3] and part.routing.layers == [2, 3]
    assert part._t["q.2"].shape == (1, 16, 16) and part._t["k.2"].shape == (1, 16, 16)  # one KV head read
    assert torch.equal(part.attention(2, 3), full.attention(2, 3))
    assert torch.equal(part.routing.indices, full.routing.indices[2:])
    with pytest.raises(CaptureError, match=r"0\.\.3"):
        trace(model, None, adapter, x, layers=[4])
    with pytest.raises(CaptureError, match=r"0\.\.3"):
        trace(model, None, adapter, x, heads=[7])
    with pytest.raises(CaptureError, match=r"layer 0 is out of range: this trace's attention has layers 2, 3 "
                                           r"\(the model has layers 0\.\.3: trace with layers"):
        part.attention(0, 3)
    with pytest.raises(CaptureError, match=r"head 0 is out of range: this trace's attention has heads 3 "
                                           r"\(the model has heads 0\.\.3\)"):
        part.attention(2, 0)
    # one rule for negative indices: they count from the model's last layer / head, whatever was captured
    assert torch.equal(part.attention(-1, -1), part.attention(3, 3))
    assert torch.equal(part.routing.at(-2).indices, part.routing.indices[0]) and part.routing.at(-2).layer == 2
    with pytest.raises(CaptureError, match="layer 0 is out of range"):
        part.routing.at(-4)
    with pytest.raises(CaptureError, match="choose any of"):
        trace(model, None, adapter, x, what=["patterns"])
    dense = tiny("llama")
    with pytest.raises(CaptureError, match="dense"):
        trace(dense, None, adapter_for(dense.config)[0], x, what=["routing"])


def test_trace_twice_equal_and_inputs():
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    x = ids(12)[0].tolist()
    a = trace(model, None, adapter, x, what=["attention", "routing", "residuals"])
    b = trace(model, None, adapter, torch.tensor(x), what=["attention", "routing", "residuals"])
    assert a._t.keys() == b._t.keys() and all(torch.equal(a._t[k], b._t[k]) for k in a._t)

    class Gen:  # duck-typed Generation
        prompt_ids, token_ids, token_channels = x[:8], x[8:], ["analysis", "analysis", "final", "final"]

    g = trace(model, None, adapter, Gen(), what=["routing"])
    assert g.tokens.ids == x and g.tokens.channels == ["prompt"] * 8 + Gen.token_channels
    assert torch.equal(g.routing.indices, a.routing.indices)


def test_logit_lens_and_residuals():
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    x = ids(10)
    t = trace(model, None, adapter, x, what=["residuals"], dtype=torch.float32)
    assert t.residual(3).shape == (10, 64)
    assert torch.equal(t.lens_logits(-1), logits(model, x)[0])  # the last layer's lens is the model's output
    t_default = trace(model, None, adapter, x, what=["residuals"])  # residuals are kept in the model's dtype
    assert t_default.residual(3).dtype == torch.float32
    assert torch.equal(t_default.lens_logits(-1), logits(model, x)[0])
    t16 = trace(model, None, adapter, x, what=["residuals"], dtype=torch.float16)  # asked: close, not equal
    assert (t16.lens_logits(-1) - logits(model, x)[0]).abs().max() < 1e-2
    lens = t.logit_lens(1, k=3)
    assert lens.ids.shape == (10, 3) and (lens.probs[:, :-1] >= lens.probs[:, 1:]).all()
    with pytest.raises(CaptureError, match="residual stream after layer 0 was not captured"):
        trace(model, None, adapter, x, what=["routing"]).residual(0)


# ---- the model is left as it was ---------------------------------------------------------------------------
def test_exception_inside_capture_leaves_nothing_behind():
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    x = ids()
    before, hooks = logits(model, x), all_hooks(model)
    attn_names, mask_names = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = adapter.mlp_module(model, 2).register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with capture(model, adapter, what=["routing", "attention", "residuals"]):
                assert model.config._attn_implementation.startswith("workbench_capture")
                logits(model, x)
    finally:
        handle.remove()
    assert all_hooks(model) == hooks
    assert model.config._attn_implementation == "eager"
    assert set(AttentionInterface._global_mapping) == attn_names
    assert set(AttentionMaskInterface._global_mapping) == mask_names
    assert torch.equal(logits(model, x), before)


def test_capture_around_own_forwards():
    model = tiny("olmoe")
    adapter, _ = adapter_for(model.config)
    hooks = all_hooks(model)
    with capture(model, adapter, what=["routing"]) as cap:
        logits(model, ids(6))
        logits(model, ids(9))
    with pytest.raises(CaptureError, match="call=i"):
        cap.trace()
    assert len(cap.trace(call=1).tokens) == 9
    batch = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with capture(model, adapter, what=["routing"]) as cap:  # a batch of your own: one Trace per row
        logits(model, batch)
    rows = cap.trace()
    assert len(rows) == 2 and rows[1].tokens.ids == [9, 10, 11, 12]
    with capture(model, adapter, what=["routing"]) as single:
        logits(model, batch[1:])
    assert torch.allclose(rows[1].routing.logits, single.trace().routing.logits, atol=1e-5, rtol=0)  # batched matmul: last bits
    assert all_hooks(model) == hooks


# ---- budget ------------------------------------------------------------------------------------------------
def test_budget():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("500MB") == 5 * 10**8
    assert parse_bytes("1GiB") == 2**30 and parse_bytes(1234) == 1234
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    hooks = all_hooks(model)
    size = trace_bytes(model.config, adapter, 24, what=("attention",), dtype=torch.float16)
    assert size["attention"] == 24 * 4 * (4 + 2) * 16 * 2
    with pytest.raises(CaptureBudgetError) as e:
        # the forward's own estimate is ~148 KB here: 160 KB leaves room for some of the request
        trace(model, None, adapter, ids(), what=["routing", "attention", "residuals"], budget=160_000)
    msg = str(e.value)
    assert "routing only" in msg and "layers=[0, 1]" in msg and "heads=[0]" in msg and "first" in msg
    assert all_hooks(model) == hooks
    with pytest.raises(CaptureBudgetError):  # the same check inside a capture of the user's own forward
        with capture(model, adapter, budget="10KB"):
            logits(model, ids())
    assert all_hooks(model) == hooks and model.config._attn_implementation == "eager"


def test_gpt_oss_20b_sizes():
    config = GptOssConfig(num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088)
    size = trace_bytes(config, None, 4096, what=("routing", "attention"), dtype=torch.bfloat16)
    assert 0.85e9 < size["attention"] < 0.95e9  # vs ~51 GB for every full fp32 pattern
    assert size["routing"] < 20e6


# ---- files -------------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    t = trace(model, None, adapter, ids(14), what=["routing", "attention", "residuals"], preset="fp32")
    path = t.save(tmp_path / "run.wbtrace")
    u = Trace.load(path, model=model)
    assert u._t.keys() == t._t.keys() and all(torch.equal(u._t[k], t._t[k]) for k in t._t)
    assert all(u._t[k].dtype == t._t[k].dtype for k in t._t)
    assert u.tokens == t.tokens and u.meta == t.meta
    assert torch.equal(u.attention(0), t.attention(0)) and torch.equal(u.sink_mass, t.sink_mass)
    assert torch.equal(u.routing.weights, t.routing.weights)
    assert torch.equal(u.lens_logits(2, model=model), t.lens_logits(2))
    with pytest.raises(CaptureError, match="model="):
        u.lens_logits(2)
    other = tiny("mixtral")
    with pytest.raises(TraceModelMismatchError):
        Trace.load(path, model=other)


def test_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    path = trace(model, None, adapter, ids(8)).save(tmp_path / "run.wbtrace")
    data = path.read_bytes()
    (tmp_path / "junk.wbtrace").write_bytes(b"not a trace at all" * 10)
    (tmp_path / "cut.wbtrace").write_bytes(data[: len(data) - 100])
    (tmp_path / "cut2.wbtrace").write_bytes(data[:40])
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["workbench"])
    save_file({k: v for k, v in tensors.items() if k != "q.1"}, tmp_path / "missing.wbtrace",
              metadata={"workbench": json.dumps(meta)})
    save_file(tensors, tmp_path / "future.wbtrace", metadata={"workbench": json.dumps(dict(meta, version=99))})
    save_file(tensors, tmp_path / "plain.safetensors")
    for name, match in [("junk.wbtrace", "not a readable"), ("cut.wbtrace", "not a readable"),
                        ("cut2.wbtrace", "not a readable"), ("missing.wbtrace", "q.1"),
                        ("future.wbtrace", "version 99"), ("plain.safetensors", "not a workbench trace")]:
        with pytest.raises(TraceFileError, match=match):
            Trace.load(tmp_path / name)


# ---- presets: mxfp4 (dequantized on this CPU), bitsandbytes, an MLP that never calls its router ------------
def test_mxfp4_fixture_routing_agrees_with_bf16_except_near_ties():
    """Same seed, experts rounded to mxfp4. Layer 0's router input does not depend on any expert, so its routing
    is bitwise equal; later layers differ only where the top-k margin is smaller than the router-logit shift
    the rounding caused (measured: 22 of 150 token-layers on a 50-token text)."""
    bf16 = tiny("gpt_oss", torch.bfloat16)
    mx = AutoModelForCausalLM.from_pretrained(fixtures.tiny_checkpoint("gpt_oss", mxfp4=True)).eval()
    adapter, _ = adapter_for(mx.config)
    tokenizer = AutoTokenizer.from_pretrained(fixtures.tiny_checkpoint("gpt_oss"))
    text = ("The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is "
            "Paris. Attention lets every token look back.")
    x = torch.tensor([tokenizer(text)["input_ids"]])
    before = logits(mx, x)
    with capture(mx, adapter, what=["routing", "attention", "residuals"]):
        assert torch.equal(logits(mx, x), before)
    a = trace(bf16, tokenizer, adapter, x, what=["routing"])
    b = trace(mx, tokenizer, adapter, x, what=["routing"])
    assert torch.equal(a.routing.logits[0], b.routing.logits[0]) and torch.equal(a.routing.indices[0], b.routing.indices[0])
    k = adapter.top_k(mx.config)
    differ = (a.routing.indices.sort(-1).values != b.routing.indices.sort(-1).values).any(-1)
    for layer, token in differ.nonzero().tolist():
        shift = (a.routing.logits[layer, token] - b.routing.logits[layer, token]).abs().max()
        margins = [r.routing.logits[layer, token].sort(descending=True).values for r in (a, b)]
        assert min(m[k - 1] - m[k] for m in margins) <= 2 * shift
    assert differ.float().mean() < 0.3
    a.check_model(mx)  # the config hash ignores the preset: a bf16 trace is valid for the mxfp4-loaded model




def test_routing_read_where_the_router_module_is_never_called():
    model = AutoModelForCausalLM.from_pretrained(fixtures.tiny_checkpoint("gpt_oss"), dtype=torch.bfloat16).eval()
    adapter, _ = adapter_for(model.config)
    x = ids(16)
    before = logits(model, x)
    for layer in model.model.layers:
        layer.mlp = fixtures.MLPThatNeverCallsItsRouter(layer.mlp)
    fired = []
    handles = [layer.mlp.router.register_forward_hook(lambda *a: fired.append(1)) for layer in model.model.layers]
    t = trace(model, None, adapter, x, what=["routing"])
    for h in handles:
        h.remove()
    assert not fired and torch.equal(logits(model, x), before)
    for row, layer in enumerate(model.model.layers):
        indices, scores = layer.mlp.used[0]
        assert torch.equal(t.routing.indices[row], indices) and torch.equal(t.routing.weights[row], scores)


@pytest.mark.parametrize("bits", ["int8", "nf4"])
def test_bitsandbytes_presets(bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_8bit=True) if bits == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(fixtures.tiny_checkpoint("gpt_oss"), quantization_config=q,
                                                 dtype=torch.bfloat16).eval()
    adapter, _ = adapter_for(model.config)
    x = ids(12)
    before, hooks = logits(model, x), all_hooks(model)
    with capture(model, adapter, what=["routing", "attention", "residuals"]) as cap:
        assert torch.equal(logits(model, x), before)
    assert all_hooks(model) == hooks and torch.equal(logits(model, x), before)
    t = cap.trace()
    total = t.attention(0).sum(-1) + t.sink_mass[0]
    assert (total - 1).abs().max() < 1e-5


def test_trace_of_text_messages_and_generation_with_tokenizer():
    model = tiny("gpt_oss")
    adapter, _ = adapter_for(model.config)
    tokenizer = AutoTokenizer.from_pretrained(fixtures.tiny_checkpoint("gpt_oss"))
    t = trace(model, tokenizer, adapter, "The capital of France is Paris.", what=["routing"])
    assert "".join(t.tokens.strings) == tokenizer.decode(t.tokens.ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    m = trace(model, tokenizer, adapter, messages, what=["routing"])
    assert "<|start|>" in m.tokens.strings and m.meta["tokenizer"] == tokenizer.name_or_path
    from workbench.chat import generation
    fields = {f.name for f in __import__("dataclasses").fields(generation.Generation)}
    assert {"prompt_ids", "token_ids", "token_channels"} <= fields


@pytest.mark.slow
def test_smollm2_real_model(smollm2_dir):
    """The real SmolLM2-135M (30 layers, 9 heads, GQA 3): logits unchanged under its default sdpa, patterns from
    the recorded q/k equal eager output_attentions (layer 0 bitwise; later layers within 1e-5, sdpa vs eager
    residual rounding)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    adapter, _ = adapter_for(model.config)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
    x = torch.tensor([_render(tokenizer, messages)])
    before = logits(model, x)
    with capture(model, adapter, what=["attention", "residuals"], dtype=torch.float32) as cap:
        assert torch.equal(logits(model, x), before)
    t = cap.trace(tokenizer)
    assert torch.equal(t.lens_logits(-1, model), before[0])
    model.set_attn_implementation("eager")
    ref = eager_attentions(model, x)
    assert torch.equal(t.attention(0), ref[0][0])
    assert max((t.attention(layer) - ref[layer][0]).abs().max() for layer in range(30)) < 1e-5


def _render(tokenizer, messages):
    from workbench.chat import harmony as chat

    return chat.render(tokenizer, messages)
