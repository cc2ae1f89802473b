"""Direct logit attribution, checked against independent computations: the terms sum to lm_head(norm(residual))
[target] (the residual from the workbench's own float32 trace), each head equals its slice of o_proj's input
(taken with a plain forward hook) times o_proj's weight columns dotted with the unembedding scaled by the final
norm's weight and 1/rms, each expert equals the model's own experts module run on that one expert, and the
shared expert its module times its sigmoid gate. On every tiny MoE family, on SmolLM2 and on gpt-oss-nano when
it is there."""
from __future__ import annotations

import types

import plotly.graph_objects as go
import pytest
import torch

import workbench as wb
from workbench import fixtures
from workbench.analysis.attribution import attribute, expert_output
from workbench.errors import AttributionError, ViewError
from workbench.model.adapters import LLAMA_LIKE

FAMILIES = list(fixtures.FAMILIES)
TEXT = "hello world, how are you today"
_sessions: dict = {}


def session(family: str):
    if family not in _sessions:
        _sessions[family] = wb.load(str(fixtures.tiny_checkpoint(family)), preset="cpu")
    return _sessions[family]


def nano_session():
    try:
        path = fixtures.nano_path()
    except Exception as e:  # not built yet (or not shipped in this checkout)
        pytest.skip(f"gpt-oss-nano is not available: {e}")
    if "nano" not in _sessions:
        _sessions["nano"] = wb.load(str(path), preset="cpu")
    return _sessions["nano"]


def frozen_logit_by_hand(s, text, target, position):
    """lm_head(norm(x))[target] with x the final residual from a float32 trace, and the vector u with
    logit(c) = c . u (final norm weight, 1/rms(x) frozen, unembedding row), computed from the parameters."""
    t = s.trace(text, what=["residuals"], dtype=torch.float32)
    x = t.residual(-1)[position]
    norm, head = s.model.model.norm, s.model.get_output_embeddings()
    with torch.no_grad():
        logit = head(norm(x))[target]
        u = head.weight[target] * norm.weight / torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
    return float(logit), u


class Hooked:
    """Plain forward hooks: o_proj inputs, layer 0's input, and what each experts module was called with."""

    def __init__(self, s):
        self.o_in, self.experts_in, self.handles = {}, {}, []
        for i, layer in enumerate(s.adapter.layer_list(s.model)):
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, args, i=i: self.o_in.__setitem__(i, args[0][0].detach().clone())))
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                self.handles.append(experts.register_forward_pre_hook(
                    lambda m, args, i=i: self.experts_in.__setitem__(i, tuple(a.detach().clone() for a in args))))
        self.handles.append(s.adapter.layer_list(s.model)[0].register_forward_pre_hook(
            lambda m, args, kwargs: setattr(self, "embedding", (args[0] if args else kwargs["hidden_states"])[0]),
            with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def check_against_hooks(s, a, text, position):
    """Heads, attention biases, experts, shared experts and embedding of `a` against hand computations."""
    logit, u = frozen_logit_by_hand(s, text, a.target, position)
    ids = s.tokenizer(text)["input_ids"]
    with Hooked(s) as h, torch.no_grad():
        s.model(torch.tensor([ids]))
        assert a.embedding == pytest.approx(float(h.embedding[position] @ u), abs=1e-5)
        heads = s.model.config.num_attention_heads
        for layer, z in h.o_in.items():
            o_proj = s.adapter.layer_list(s.model)[layer].self_attn.o_proj
            d = z.shape[-1] // heads
            for head in range(heads):
                piece = z[position, head * d:(head + 1) * d] @ o_proj.weight[:, head * d:(head + 1) * d].T
                assert float(a.heads[layer, head]) == pytest.approx(float(piece @ u), abs=1e-5), (layer, head)
            if o_proj.bias is not None:
                assert float(a.attention_bias[layer]) == pytest.approx(float(o_proj.bias @ u), abs=1e-5)
        for layer, (x, indices, weights) in h.experts_in.items():
            experts = s.adapter.layer_list(s.model)[layer].mlp.experts
            for slot, e in enumerate(indices[position].tolist()):  # the model's own code on one expert
                one = experts(x[position:position + 1], indices[position:position + 1, slot:slot + 1],
                              weights[position:position + 1, slot:slot + 1])[0]
                assert float(a.experts[layer, e]) == pytest.approx(float(one @ u), abs=1e-5), (layer, e)
            chosen = set(indices[position].tolist())
            assert all(a.experts[layer, e] == 0 for e in range(a.experts.shape[1]) if e not in chosen)
            mlp = s.adapter.layer_list(s.model)[layer].mlp
            if hasattr(mlp, "shared_expert"):
                shared = torch.sigmoid(mlp.shared_expert_gate(x[position])) * mlp.shared_expert(x[position])
                assert float(a.shared[layer]) == pytest.approx(float(shared @ u), abs=1e-5)
    return logit


# ---- sums and pieces -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_terms_sum_to_the_frozen_norm_logit_and_pieces_equal_hooks(family):
    s = session(family)
    a = s.attribute(TEXT, position=-2)
    position = len(s.tokenizer(TEXT)["input_ids"]) - 2
    logit = check_against_hooks(s, a, TEXT, position)
    assert a.position == position
    assert a.total == pytest.approx(logit, abs=2e-5) and a.logit == pytest.approx(logit, abs=2e-5)
    assert a.target == int(s.model(torch.tensor([s.tokenizer(TEXT)["input_ids"]])).logits[0, position].argmax())
    assert set(a.checks) >= {"attention = heads + bias", "mlp = weighted experts + shared", "logit = sum of terms"}
    assert max(a.checks.values()) < 1e-4
    # the layer totals are the pieces summed
    assert torch.allclose(a.attention, a.heads.sum(1) + a.attention_bias)
    routed = s.adapter.moe_layers(s.model)
    assert a.moe_layers == routed
    for layer in routed:
        assert float(a.mlp[layer]) == pytest.approx(float(a.experts[layer].sum() + a.shared[layer]), abs=1e-5)
    k = s.adapter.top_k(s.model.config)
    assert [kind for kind in a.kinds].count("expert") == k * len(routed)


def test_nano_terms_sum_and_pieces_equal_hooks():
    s = nano_session()
    text = "The cat sat on the mat because"
    a = s.attribute(text)
    position = len(s.tokenizer(text)["input_ids"]) - 1
    logit = check_against_hooks(s, a, text, position)
    assert a.total == pytest.approx(logit, abs=1e-4)


@pytest.mark.slow
def test_smollm2_paris(smollm2_session):
    s = smollm2_session
    text = "The capital of France is"
    a = s.attribute(text, target=" Paris")
    position = len(s.tokenizer(text)["input_ids"]) - 1
    logit = check_against_hooks(s, a, text, position)
    assert a.target_token == " Paris" and a.total == pytest.approx(logit, abs=1e-4)
    assert a.kinds.count("head") == 30 * 9 and a.kinds.count("mlp") == 30 and a.experts is None
    assert a.target == int(s.model(torch.tensor([s.tokenizer(text)["input_ids"]])).logits[0, -1].argmax())


def test_expert_recomputation_equals_the_experts_module():
    for family in ("gpt_oss", "mixtral", "olmoe"):
        s = session(family)
        experts = s.adapter.mlp_module(s.model, 0).experts
        x = torch.randn(3, s.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        for e in range(2):
            w = torch.full((3, 1), 0.375)
            model_says = experts(x, torch.full((3, 1), e), w)
            assert torch.allclose(expert_output(experts, e, x) * 0.375, model_says, atol=1e-6, rtol=1e-5), family


def test_attribution_leaves_the_model_as_it_was():
    s = session("gpt_oss")
    ids = s.tokenizer(TEXT)["input_ids"]

    def hooks():
        return {(n, k) for n, m in s.model.named_modules() for k in (*m._forward_hooks, *m._forward_pre_hooks)}

    before_hooks = hooks()
    with torch.no_grad():
        before = s.model(torch.tensor([ids])).logits
    s.attribute(TEXT)
    with pytest.raises(AttributionError):
        s.attribute(TEXT, position=99)
    with torch.no_grad():
        assert torch.equal(before, s.model(torch.tensor([ids])).logits)
    assert hooks() == before_hooks and not s.busy


# ---- the result ------------------------------------------------------------------------------------------

def test_top_figure_and_repr():
    s = session("gpt_oss")
    a = s.attribute(TEXT)
    top = a.top(5)
    assert len(top) == 5 and [abs(v) for _, v in top] == sorted((abs(v) for v in a.values.tolist()), reverse=True)[:5]
    assert "frozen" in repr(a) and "rms" in a._repr_html_() and top[0][0] in a._repr_html_()
    bars = a.figure(n=7)
    assert isinstance(bars, go.Figure) and list(bars.data[0].y) == [label for label, _ in a.top(7)][::-1]
    assert list(bars.data[0].x) == [v for _, v in a.top(7)][::-1]
    heads = a.figure("heads")
    assert torch.equal(torch.tensor(heads.data[0].z), a.heads)
    experts = a.figure("experts")
    z = experts.data[0].z
    for layer_row, layer in enumerate(a.moe_layers):
        for e in range(a.experts.shape[1]):
            assert (z[layer_row][e] is None) == (a.experts[layer, e] == 0)
    with pytest.raises(ViewError, match="kind"):
        a.figure("nope")
    with pytest.raises(AttributionError, match="attribution_figure"):
        attribute(s, TEXT).figure()  # made without the session: no views handed in


def test_experts_heatmap_of_a_dense_model_says_why(monkeypatch):
    s = session("gpt_oss")
    a = s.attribute(TEXT)
    monkeypatch.setattr(a, "experts", None)
    monkeypatch.setattr(a, "moe_layers", [])
    with pytest.raises(ViewError, match="dense"):
        a.figure("experts")


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_targets_and_positions():
    s = session("gpt_oss")
    n = len(s.tokenizer(TEXT)["input_ids"])
    with pytest.raises(AttributionError, match="not one"):
        s.attribute(TEXT, target="hello world")
    with pytest.raises(AttributionError, match="out of range"):
        s.attribute(TEXT, target=10**9)
    with pytest.raises(AttributionError, match="token id"):
        s.attribute(TEXT, target=2.0)
    with pytest.raises(AttributionError, match=f"positions 0..{n - 1}"):
        s.attribute(TEXT, position=n)
    with pytest.raises(AttributionError, match="out of range"):
        s.attribute(TEXT, position=-n - 1)
    with pytest.raises(AttributionError, match="integer"):
        s.attribute(TEXT, position=True)
    assert s.attribute(TEXT, position=-n).position == 0
    one = s.tokenizer.encode(" how", add_special_tokens=False)
    assert len(one) == 1 and s.attribute(TEXT, target=" how").target == one[0]
    assert s.attribute(TEXT, target=torch.tensor(one[0])).target == one[0]  # 0-d tensors and numpy ints too


def test_a_residual_stream_attribution_cannot_model_raises():
    """Gemma-2 normalises each attention and MLP output before adding it: the parts do not sum to the residual."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = session("mixtral").tokenizer
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.normal_(p, 0.5, 0.3)  # far from the identity, so the post-norms matter
    fake = types.SimpleNamespace(model=model, tokenizer=tokenizer, adapter=LLAMA_LIKE)
    with pytest.raises(AttributionError, match="does not reproduce"):
        attribute(fake, TEXT)


@pytest.mark.slow
def test_readme_attribution_and_sae_section_runs_as_written(smollm2_dir):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "s.attribute(" in b)
    namespace = {}
    exec(compile(block, "README attribution/SAE section", "exec"), namespace)
    a = namespace["a"]
    assert a.total == pytest.approx(a.logit, abs=1e-4) and [label for label, _ in a.top(3)] == \
        ["L29 mlp", "L28 mlp", "L23 head 4"]
    b = namespace["b"]
    assert b.experts is not None and b.total == pytest.approx(b.logit, abs=1e-4)
    assert namespace["f"].layer == 1 and namespace["g"].token_ids
