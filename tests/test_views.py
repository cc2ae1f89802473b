"""workbench.views: every figure's numbers checked against the trace they came from, by naive recomputation.

Tiny random checkpoints (fast): gpt-oss (sinks, sliding window 4 on even layers, top-4 of 8), Mixtral (no
sinks, top-2 of 4), Qwen3-MoE (layer 1 dense: routing on layers [0, 2]). One slow test on SmolLM2.
"""
import math
from collections import Counter

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import workbench as wb
from workbench import views
from workbench.errors import CaptureError
from workbench.views import token_labels, visible
from workbench.views.attention import SINK

TEXT = "The cat sat on the mat.\n\tThe cat sat again, the end."


def _session(tiny_checkpoint, family):
    return wb.load(str(tiny_checkpoint(family)), preset="cpu")


@pytest.fixture(scope="module")
def oss(tiny_checkpoint):
    return _session(tiny_checkpoint, "gpt_oss")


@pytest.fixture(scope="module")
def oss_trace(oss):
    return oss.trace(TEXT, what=["routing", "attention", "residuals"], dtype=torch.float32)


@pytest.fixture(scope="module")
def mixtral_trace(tiny_checkpoint):
    return _session(tiny_checkpoint, "mixtral").trace(TEXT)


@pytest.fixture(scope="module")
def qwen3_trace(tiny_checkpoint):
    return _session(tiny_checkpoint, "qwen3_moe").trace(TEXT)


@pytest.fixture(scope="module")
def long_trace(oss):
    """2,000 token ids through the tiny gpt-oss: the shape of a long conversation, a few seconds on a CPU."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(oss.tokenizer) - 30, (2000,), generator=g).tolist()
    return oss.trace(ids, what=["routing", "attention", "residuals"])


def _visible_mask(n, rows, cols, window):
    """Naive: is key j visible to query i (causal, and within the sliding window if any)?"""
    return np.array([[j <= i and (window is None or j > i - window) for j in cols] for i in rows])


# ---- labels ----------------------------------------------------------------------------------------------------
def test_visible_whitespace_controls_and_special_tokens():
    assert visible(" the") == "·the"
    assert visible("\n\n") == "⏎⏎"
    assert visible("\tx\r") == "⇥x␍"
    assert visible("") == "∅"
    assert visible("\x00\x1b\x7f") == "␀␛␡"  # raw control characters break the figure's JSON in the browser
    assert visible("<|start|>") == "<|start|>"
    assert visible("abcdefghij", limit=5) == "abcd…"


def test_token_labels_unique_and_numbered():
    strings = [" the", "cat", " the", "\n", "<|end|>", "\n"]
    assert token_labels(strings) == ["0 ·the", "1 cat", "2 ·the", "3 ⏎", "4 <|end|>", "5 ⏎"]
    assert token_labels(strings, numbered=False) == ["0 ·the", "cat", "2 ·the", "3 ⏎", "<|end|>", "5 ⏎"]
    assert token_labels(strings, positions=range(3, 5)) == ["3 ⏎", "4 <|end|>"]
    # a token whose own text looks like a numbered label still cannot collide (its space becomes ·)
    tricky = ["0 a", "a", "a"]
    labels = token_labels(tricky, numbered=False)
    assert len(set(labels)) == 3 and labels[0] == "0·a"


def test_token_labels_of_a_trace(oss_trace):
    labels = token_labels(oss_trace)
    assert len(labels) == len(set(labels)) == len(oss_trace.tokens)
    assert labels[0] == f"0 {visible(oss_trace.tokens.strings[0])}"
    assert any("⏎" in s for s in labels) and any("⇥" in s for s in labels)


# ---- attention -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3), (-1, 0)])
def test_attention_heatmap_equals_trace_with_sink_column(oss_trace, layer, head):
    t = oss_trace
    fig = views.attention_heatmap(t, layer, head)
    layer = layer % 4
    n = len(t.tokens)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    assert list(hm.y) == token_labels(t)
    assert list(hm.x) == token_labels(t) + [SINK]
    z = np.asarray(hm.z)
    assert z.shape == (n, n + 1)
    window = t.meta["attention"][str(layer)]["window"]
    seen = _visible_mask(n, range(n), range(n), window)
    attn = t.attention(layer, head).numpy()
    assert np.array_equal(z[:, :n][seen], attn[seen])
    assert np.isnan(z[:, :n][~seen]).all()  # masked keys are blank, not 0
    assert np.array_equal(z[:, n], t.sink_mass[layer, head].numpy())
    kind = f"sliding window {window}" if window else "full attention"
    assert fig.layout.title.text.startswith(f"Layer {layer} · head {head}") and kind in fig.layout.title.text
    assert fig.layout.xaxis.title.text.startswith("key") and fig.layout.yaxis.title.text.startswith("query")
    assert "probability" in hm.hovertemplate and "query" in hm.hovertemplate and "key" in hm.hovertemplate


def test_attention_heatmap_without_sinks(mixtral_trace):
    t = mixtral_trace
    fig = views.attention_heatmap(t, 1, 2)
    z, n = np.asarray(fig.data[0].z), len(t.tokens)
    assert list(fig.data[0].x) == token_labels(t)  # no sink column
    seen = _visible_mask(n, range(n), range(n), None)
    assert np.array_equal(z[seen], t.attention(1, 2).numpy()[seen])
    assert np.allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)


def test_attention_heatmap_window_sums_earlier_keys(oss_trace):
    t = oss_trace
    n = len(t.tokens)
    fig = views.attention_heatmap(t, 1, 0, window=(5, 12))
    hm = fig.data[0]
    assert list(hm.y) == token_labels(t, range(5, 12))
    assert hm.x[0] == "≺ earlier (0–4)" and hm.x[-1] == SINK and list(hm.x[1:-1]) == token_labels(t, range(5, 12))
    z, attn = np.asarray(hm.z), t.attention(1, 0).numpy()
    assert np.allclose(z[:, 0], attn[5:12, :5].sum(1))
    assert np.allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)  # earlier + window + sink: the whole softmax
    assert f"showing queries 5–11 of {n}" in fig.layout.title.subtitle.text
    last = views.attention_heatmap(t, 1, 0, window=4)
    assert list(last.data[0].y) == token_labels(t, range(n - 4, n))


def test_head_grid_sink_mass_and_entropy(oss_trace):
    t = oss_trace
    fig = views.head_grid(t)
    assert np.array_equal(np.asarray(fig.data[0].z), t.sink_mass.mean(-1).numpy())
    assert list(fig.data[0].x) == [f"head {h}" for h in t.heads]
    assert list(fig.data[0].y) == ["layer 0 · sliding 4", "layer 1 · full", "layer 2 · sliding 4", "layer 3 · full"]

    naive = np.zeros((4, 4))
    for layer in range(4):
        for head in range(4):
            p, s = t.attention(layer, head).double(), t.sink_mass[layer, head].double()
            ent = [-sum(float(x) * math.log2(x) for x in row if x > 0) - (float(si) * math.log2(si) if si > 0 else 0)
                   for row, si in zip(p, s)]
            naive[layer, head] = sum(ent) / len(ent)
    fig = views.head_grid(t, metric="entropy")
    assert np.allclose(np.asarray(fig.data[0].z), naive, atol=1e-4)
    assert "entropy" in fig.layout.title.text.lower()


def test_sink_mass_figure(oss_trace):
    t = oss_trace
    fig = views.sink_mass(t)
    heat, *lines = fig.data
    assert np.array_equal(np.asarray(heat.z), t.sink_mass.mean(-1).numpy())
    assert len(lines) == 4 and all(isinstance(s, go.Scatter) for s in lines)
    for row, line in enumerate(lines):
        assert np.array_equal(np.asarray(line.y), t.sink_mass[row].mean(0).numpy())
        assert list(line.text) == token_labels(t)
    assert lines[0].line.dash == "dot" and lines[1].line.dash == "solid"  # sliding vs full layers


# ---- routing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family_trace,layer", [("oss_trace", 2), ("mixtral_trace", 1), ("qwen3_trace", 2)])
def test_expert_heatmap_is_scattered_weights(request, family_trace, layer):
    t = request.getfixturevalue(family_trace)
    r = t.routing
    row, n_experts = r.layers.index(layer), r.logits.shape[-1]
    naive = np.zeros((len(t.tokens), n_experts), dtype=np.float32)
    for i in range(len(t.tokens)):
        for e, w in zip(r.indices[row, i].tolist(), r.weights[row, i].tolist()):
            naive[i, e] = w
    fig = views.expert_heatmap(t, layer)
    assert np.array_equal(np.asarray(fig.data[0].z), naive)
    assert list(fig.data[0].x) == [f"expert {e}" for e in range(n_experts)]
    assert list(fig.data[0].y) == token_labels(t)
    assert fig.layout.title.text.startswith(f"Layer {layer} · routing weights")


def test_expert_load_counts(oss_trace):
    t, r = oss_trace, oss_trace.routing
    fig = views.expert_load(t)
    k, n_experts, n = r.indices.shape[-1], r.logits.shape[-1], len(t.tokens)
    assert len(fig.data) == len(r.layers) and [bar.visible for bar in fig.data] == [True, False, False, False]
    for row, bar in enumerate(fig.data):
        naive = Counter(e for i in range(n) for e in r.indices[row, i].tolist())
        assert list(bar.customdata) == [naive[e] for e in range(n_experts)]
        assert np.allclose(bar.y, [naive[e] / n for e in range(n_experts)])
    assert fig.layout.shapes[0].y0 == pytest.approx(k / n_experts)  # the uniform line
    assert "k/E = 4/8" in fig.layout.annotations[0].text
    assert [s.label for s in fig.layout.sliders[0].steps] == [str(layer) for layer in r.layers]


def _links(fig):
    s = fig.data[0]
    labels = s.node.label
    return {(labels[a], labels[b]): v for a, b, v in zip(s.link.source, s.link.target, s.link.value)}


def test_expert_flow_counts_transitions(oss_trace, qwen3_trace):
    t, r = oss_trace, oss_trace.routing
    chain = (0, 1, 3)
    naive = Counter()
    for a, b in zip(chain, chain[1:]):
        for i in range(len(t.tokens)):
            naive[f"L{a} · e{int(r.indices[a, i, 0])}", f"L{b} · e{int(r.indices[b, i, 0])}"] += 1
    fig = views.expert_flow(t, layers=chain)
    assert isinstance(fig.data[0], go.Sankey)
    assert _links(fig) == dict(naive)
    assert "0 → 1 → 3" in fig.layout.title.text
    # Qwen3-MoE: the default is the first two MoE layers, 0 and 2 (layer 1 is dense)
    fig = views.expert_flow(qwen3_trace)
    assert sum(_links(fig).values()) == len(qwen3_trace.tokens)
    assert all(a.startswith("L0") and b.startswith("L2") for a, b in _links(fig))


def test_coactivation_counts(oss_trace):
    t, r = oss_trace, oss_trace.routing
    n_experts = r.logits.shape[-1]
    naive = np.zeros((n_experts, n_experts))
    for i in range(len(t.tokens)):
        chosen = r.indices[1, i].tolist()
        for a in chosen:
            for b in chosen:
                if a != b:
                    naive[a, b] += 1
    z = np.asarray(views.coactivation(t, 1).data[0].z)
    off = ~np.eye(n_experts, dtype=bool)
    assert np.array_equal(z[off], naive[off]) and np.isnan(np.diag(z)).all()


def test_routing_entropy(mixtral_trace):
    t, r = mixtral_trace, mixtral_trace.routing
    naive = np.zeros((len(r.layers), len(t.tokens)))
    for row in range(len(r.layers)):
        for i in range(len(t.tokens)):
            logits = r.logits[row, i].double().tolist()
            top = max(logits)
            p = [math.exp(x - top) for x in logits]
            p = [x / sum(p) for x in p]
            naive[row, i] = -sum(x * math.log2(x) for x in p if x > 0)
    fig = views.routing_entropy(t)
    assert np.allclose(np.asarray(fig.data[0].z), naive, atol=1e-5)
    assert list(fig.data[0].y) == ["layer 0", "layer 1"] and list(fig.data[0].x) == token_labels(t)
    assert fig.data[0].zmax == pytest.approx(math.log2(4))


# ---- logit lens ------------------------------------------------------------------------------------------------
def test_logit_lens_grid_equals_trace_lens(oss, oss_trace):
    t = oss_trace
    fig = views.logit_lens_grid(t, oss.model, oss.tokenizer, layers=[1, 3], k=3)
    hm = fig.data[0]
    assert list(hm.y) == ["after layer 1", "after layer 3"] and list(hm.x) == token_labels(t)
    for row, layer in enumerate([1, 3]):
        lens = t.logit_lens(layer, 3, model=oss.model, tokenizer=oss.tokenizer)
        assert list(hm.text[row]) == [visible(s[0], 10) for s in lens.strings]
        assert np.allclose(np.asarray(hm.z)[row], lens.probs[:, 0].numpy(), atol=1e-6)
        assert all(cell.count("<br>") == 3 for cell in hm.customdata[row])  # 3 guesses + the real next token


# ---- long traces ----------------------------------------------------------------------------------------------
def test_long_trace_is_windowed_and_says_so(oss, long_trace):
    t = long_trace
    fig = views.attention_heatmap(t, 1, 2)  # full-attention layer, with sinks
    z = np.asarray(fig.data[0].z)
    assert z.shape == (256, 256 + 2)  # + "earlier" + sink columns
    assert "showing queries 1744–1999 of 2000" in fig.layout.title.subtitle.text
    assert np.allclose(np.nansum(z, axis=1), 1.0, atol=1e-3)
    assert len(fig.to_json()) < 2_000_000

    fig = views.expert_heatmap(t, 0)
    assert np.asarray(fig.data[0].z).shape == (256, 8)
    assert "showing tokens 1744–1999 of 2000" in fig.layout.title.subtitle.text

    fig = views.logit_lens_grid(t, oss.model, oss.tokenizer)
    assert np.asarray(fig.data[0].z).shape == (4, 64)
    assert "showing tokens 1936–1999 of 2000" in fig.layout.title.subtitle.text
    whole = t.logit_lens(3, 1, model=oss.model, tokenizer=oss.tokenizer)  # the lens on every token, then cut
    assert list(fig.data[0].text[3]) == [visible(row[0], 10) for row in whole.strings[1936:]]

    for fig in (views.head_grid(t), views.expert_load(t), views.expert_flow(t), views.coactivation(t, 0),
                views.routing_entropy(t), views.sink_mass(t)):
        assert len(fig.to_json()) < 2_000_000  # aggregates stay small however long the text


# ---- errors ----------------------------------------------------------------------------------------------------
def test_errors_name_the_valid_range(oss_trace, qwen3_trace):
    with pytest.raises(CaptureError, match=r"layer 9 is out of range: .* layers 0\.\.3"):
        views.attention_heatmap(oss_trace, 9, 0)
    with pytest.raises(CaptureError, match=r"head 4 is out of range: .* heads 0\.\.3"):
        views.attention_heatmap(oss_trace, 0, 4)
    with pytest.raises(CaptureError, match=r"must be an integer"):
        views.attention_heatmap(oss_trace, "0", 0)
    fig = views.attention_heatmap(oss_trace, np.int64(1), np.int64(0))  # numpy ints, as widgets give them
    assert fig.layout.title.text.startswith("Layer 1 · head 0")
    with pytest.raises(CaptureError, match=r"layer 1 is out of range: .*MoE layers\) has layers 0, 2"):
        views.expert_heatmap(qwen3_trace, 1)
    with pytest.raises(CaptureError, match=r"two or more different MoE layers"):
        views.expert_flow(qwen3_trace, layers=(0, 0))
    with pytest.raises(CaptureError, match=r"selects no queries"):
        views.attention_heatmap(oss_trace, 0, 0, window=(10, 5))
    with pytest.raises(CaptureError, match=r"metric='nope': choose one of sink_mass, entropy"):
        views.head_grid(oss_trace, metric="nope")


def test_errors_for_missing_parts(oss, mixtral_trace):
    routing_only = oss.trace(TEXT, what=["routing"])
    with pytest.raises(CaptureError, match=r"no attention: trace with what=\['attention'\]"):
        views.attention_heatmap(routing_only, 0, 0)
    with pytest.raises(CaptureError, match=r"no residuals.*what=\['residuals'\]"):
        views.logit_lens_grid(routing_only, oss.model, oss.tokenizer)
    attention_only = oss.trace(TEXT, what=["attention"])
    for view in (views.expert_load, views.routing_entropy, lambda t: views.expert_heatmap(t, 0)):
        with pytest.raises(CaptureError, match=r"this trace has no routing: routing was not captured; trace with "
                                               r"what=\['routing'\]"):
            view(attention_only)
    with pytest.raises(CaptureError, match=r"no attention sinks.*'mixtral'.*metric='entropy'"):
        views.head_grid(mixtral_trace)
    with pytest.raises(CaptureError, match=r"no attention sinks"):
        views.sink_mass(mixtral_trace)


# ---- a real model ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_views_on_smollm2(smollm2_session):
    s = smollm2_session
    t = s.trace(s.render("What is the capital of France?"), layers=[0, 29])
    n = len(t.tokens)
    fig = views.attention_heatmap(t, 29, 5)
    z = np.asarray(fig.data[0].z)
    seen = _visible_mask(n, range(n), range(n), None)
    assert z.shape == (n, n) and np.array_equal(z[seen], t.attention(29, 5).numpy()[seen])
    assert "<|im_start|>" in fig.data[0].y[0]
    assert "full attention" in fig.layout.title.text
    fig = views.head_grid(t, metric="entropy")
    assert np.asarray(fig.data[0].z).shape == (2, 9)
    with pytest.raises(CaptureError, match=r"no routing: .* is a dense model"):
        views.expert_load(t)
    with pytest.raises(CaptureError, match=r"layer 3 is out of range: this trace's attention has layers 0, 29 "
                                           r"\(the model has layers 0\.\.29: trace with layers="):
        views.attention_heatmap(t, 3, 0)


def test_views_raise_view_errors_and_use_the_one_index_rule(oss_trace):
    """A view's bad argument is a ViewError (still a CaptureError); -1 is the model's last layer everywhere."""
    with pytest.raises(wb.ViewError):
        views.attention_heatmap(oss_trace, 9, 0)
    last = len(oss_trace.attention_layers) - 1
    assert views.attention_heatmap(oss_trace, -1, -1).to_dict() == views.attention_heatmap(oss_trace, last, 3).to_dict()
    from workbench.views.routing import expert_weights
    assert torch.equal(expert_weights(oss_trace, -1), expert_weights(oss_trace, last))
    assert torch.equal(expert_weights(oss_trace, -1), oss_trace.routing.at(-1).weights.new_zeros(
        len(oss_trace.tokens), oss_trace.routing.logits.shape[-1]).scatter_(
        1, oss_trace.routing.at(-1).indices, oss_trace.routing.at(-1).weights.float()))
