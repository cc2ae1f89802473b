"""Interventions change exactly what they say, show up in traces as the model applied them, compose, and leave
the model bit-identical on exit (also through an exception), on every MoE family and on an MLP that computes
its router logits itself (like transformers' Mxfp4GptOssMLP)."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import workbench as wb
from workbench import fixtures
from workbench.errors import BusyError, InterventionError, WorkbenchError
from workbench.intervene.compare import compare
from workbench.intervene.interventions import (
    ablate_experts,
    ablate_heads,
    force_experts,
    router_transforms,
    scale_sinks,
    steer_experts,
)
from workbench.model.adapters import LLAMA_LIKE

FAMILIES = list(fixtures.FAMILIES)  # gpt_oss, mixtral, qwen2_moe, qwen3_moe, olmoe
_sessions: dict = {}


def session(family: str, preset: str = "cpu"):
    key = (family, preset)
    if key not in _sessions:
        path = fixtures.tiny_checkpoint(family, mxfp4=preset == "mxfp4")
        _sessions[key] = wb.load(str(path), preset=preset)
    return _sessions[key]


def ids(s, n=16, seed=1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, s.model.config.vocab_size, (n,), generator=g).tolist()


def logits(s, x):
    with torch.no_grad():
        return s.model(torch.tensor([x])).logits


def routing(s, x):
    return s.trace(x, what=["routing"]).routing


def frequent_experts(r, row: int, n: int) -> list[int]:
    """The n experts chosen most often at routing row `row`, most often first (so ablating them matters)."""
    counts = torch.bincount(r.indices[row].reshape(-1), minlength=r.logits.shape[-1])
    return counts.argsort(descending=True, stable=True)[:n].tolist()


def hooks(model):
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hs in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hs}


def state(model):
    """Everything an intervention may touch: hooks, instance attributes of modules, parameter objects."""
    return (hooks(model), {name: sorted(m.__dict__) for name, m in model.named_modules()},
            {name: id(p) for name, p in model.named_parameters()})


class ExpertsInput:
    """Records the expert indices each routed layer's experts module received."""

    def __init__(self, s):
        self.seen, self.handles = {}, []
        for layer in s.adapter.moe_layers(s.model):
            experts = getattr(s.adapter.mlp_module(s.model, layer), s.adapter.experts)
            self.handles.append(experts.register_forward_pre_hook(self._hook(layer), with_kwargs=True))

    def _hook(self, layer):
        def hook(module, args, kwargs):
            indices = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
            self.seen[layer] = indices.detach().clone()
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---- routing: ablate, force, steer on every family -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_ablated_experts_never_chosen(family):
    s = session(family)
    x = ids(s)
    before, snapshot = logits(s, x), state(s.model)
    outside = routing(s, x)
    layer = s.adapter.moe_layers(s.model)[-1]
    row = outside.row(layer)
    ablated = frequent_experts(outside, row, 2)
    with ablate_experts(s, {layer: ablated}):
        inside = routing(s, x)
        with ExpertsInput(s) as received:
            assert not torch.equal(logits(s, x), before)
    assert torch.equal(logits(s, x), before) and state(s.model) == snapshot
    for indices in (inside.indices[row], received.seen[layer]):
        assert not torch.isin(indices, torch.tensor(ablated)).any()
    assert torch.equal(received.seen[layer].cpu(), inside.indices[row])
    # the router saw -inf for the ablated experts: their probability went to the others
    assert torch.isneginf(inside.logits[row][:, ablated]).all()
    probs = inside.logits[row].softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(len(x)))
    if s.adapter.renormalizes(s.model.config) or s.adapter.routing == "topk_softmax":
        assert torch.allclose(inside.weights[row].float().sum(-1), torch.ones(len(x)), atol=1e-6)
    else:  # no norm_topk_prob: the weights are the renormalised-over-the-rest probabilities of the chosen
        assert torch.equal(inside.weights[row], probs.gather(-1, inside.indices[row]).to(inside.weights.dtype))
    earlier = [i for i, l in enumerate(outside.layers) if l < layer]
    assert torch.equal(inside.logits[earlier], outside.logits[earlier])


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_experts_chosen_with_the_models_own_weights(family):
    s = session(family)
    x = ids(s)
    before = logits(s, x)
    outside = routing(s, x)
    layer = s.adapter.moe_layers(s.model)[0]
    row, k = outside.row(layer), s.adapter.top_k(s.model.config)
    forced = sorted(frequent_experts(outside, row, outside.logits.shape[-1])[-k:])  # the least used: forcing them changes most
    with force_experts(s, {layer: forced}):
        inside = routing(s, x)
        with ExpertsInput(s) as received:
            logits(s, x)
    assert torch.equal(logits(s, x), before)
    want = torch.tensor(forced).expand(len(x), k)
    assert torch.equal(inside.indices[row].sort(-1).values, want)
    assert torch.equal(received.seen[layer].cpu().sort(-1).values, want)
    # the router's own weighting over the forced experts' (unchanged) logits
    assert torch.equal(inside.logits[row][:, forced], outside.logits[row][:, forced])
    masked = torch.full_like(outside.logits[row], float("-inf"))
    masked[:, forced] = outside.logits[row][:, forced]
    indices, weights = s.adapter.route(masked, s.model.config)
    assert torch.equal(inside.indices[row], indices) and torch.equal(inside.weights[row], weights)
    assert torch.allclose(inside.weights[row].float().sum(-1), torch.ones(len(x)), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_moves_router_logits_by_exactly_the_amount(family):
    s = session(family)
    x = ids(s)
    before = logits(s, x)
    outside = routing(s, x)
    layer = s.adapter.moe_layers(s.model)[0]
    row = outside.row(layer)
    n = outside.logits.shape[-1]
    with steer_experts(s, {layer: {n - 1: 2.0, 1: -0.5}}):
        inside = routing(s, x)
        assert not torch.equal(logits(s, x), before)
    assert torch.equal(logits(s, x), before)
    delta = torch.zeros(n)
    delta[n - 1], delta[1] = 2.0, -0.5
    assert torch.equal(inside.logits[row], outside.logits[row] + delta)  # fp32 model: the same addition
    others = [e for e in range(n) if e not in (1, n - 1)]
    assert torch.equal(inside.logits[row][:, others], outside.logits[row][:, others])
    assert torch.equal(inside.indices[row], s.adapter.route(inside.logits[row], s.model.config)[0])


def test_steering_strongly_makes_an_expert_always_chosen():
    s = session("mixtral")
    x = ids(s)
    with steer_experts(s, {0: {3: 100.0}}):
        assert (routing(s, x).indices[0] == 3).any(-1).all()


# ---- composition and undo ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_nested_interventions_compose_and_unwind(family):
    s = session(family)
    x = ids(s)
    before, snapshot = logits(s, x), state(s.model)
    layer = s.adapter.moe_layers(s.model)[0]
    steer = steer_experts(s, {layer: {0: 1.0}})
    with steer:
        steered = logits(s, x)
        steered_routing = routing(s, x)
        with ablate_experts(s, {layer: [0]}), ablate_heads(s, {0: [1]}):
            both = routing(s, x)
            mlp = s.adapter.mlp_module(s.model, layer)
            assert [t.label.split()[0] for t in router_transforms(mlp)] == ["steer", "ablate"]
        assert torch.equal(logits(s, x), steered)
        assert torch.equal(routing(s, x).logits, steered_routing.logits)
    assert torch.equal(logits(s, x), before) and state(s.model) == snapshot
    row = both.row(layer)
    assert not (both.indices[row] == 0).any() and torch.isneginf(both.logits[row][:, 0]).all()
    # the same intervention object can be entered again later
    with steer:
        assert torch.equal(logits(s, x), steered)
    with pytest.raises(InterventionError, match="already active"):
        with steer, steer:
            pass
    assert torch.equal(logits(s, x), before) and state(s.model) == snapshot


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_exception_inside_restores_bit_identical_logits(family):
    s = session(family)
    x = ids(s)
    before, snapshot = logits(s, x), state(s.model)
    first, last = s.adapter.moe_layers(s.model)[0], s.adapter.moe_layers(s.model)[-1]
    k = s.adapter.top_k(s.model.config)
    contexts = [ablate_experts(s, {first: [1]}), force_experts(s, {last: list(range(k))}),
                steer_experts(s, {first: {2: 3.0}}), ablate_heads(s, {0: [0, 2]})]
    if s.adapter.has_sinks:
        contexts.append(scale_sinks(s, {0: 0.0, 1: 2.0}))
    for group in [[c] for c in contexts] + [contexts]:
        with pytest.raises(KeyError):
            with contextlib.ExitStack() as stack:
                for c in group:
                    stack.enter_context(c)
                assert not torch.equal(logits(s, x), before)
                raise KeyError("boom")
        assert torch.equal(logits(s, x), before) and state(s.model) == snapshot


def test_failed_enter_leaves_the_outer_intervention_as_it_was():
    s = session("gpt_oss")
    x = ids(s)
    before, snapshot = logits(s, x), state(s.model)
    with force_experts(s, {1: [0, 1, 2, 3]}):
        forced = logits(s, x)
        with pytest.raises(InterventionError, match=r"leaves 3 expert\(s\) at layer 1.*fewer than the 4"):
            with ablate_experts(s, {0: [5], 1: [2]}):  # layer 0 installs, layer 1 refuses: layer 0 undone
                pass
        assert torch.equal(logits(s, x), forced)
    assert torch.equal(logits(s, x), before) and state(s.model) == snapshot


# ---- an MLP that never calls its router (transformers' Mxfp4GptOssMLP computes the logits itself) -------------


def test_routing_interventions_where_the_router_module_is_never_called():
    s = wb.load(str(fixtures.tiny_checkpoint("gpt_oss")), preset="bf16")
    x = ids(s)
    for layer in s.model.model.layers:
        layer.mlp = fixtures.MLPThatNeverCallsItsRouter(layer.mlp)
    fired = []
    handles = [layer.mlp.router.register_forward_hook(lambda *a: fired.append(1)) for layer in s.model.model.layers]
    before, snapshot = logits(s, x), state(s.model)
    outside = routing(s, x)
    mlp = s.model.model.layers[2].mlp
    for intervention, check in [
            (ablate_experts(s, {2: [0, 1, 2]}), lambda i: not torch.isin(i, torch.tensor([0, 1, 2])).any()),
            (force_experts(s, {2: [4, 5, 6, 7]}), lambda i: torch.equal(i.sort(-1).values,
                                                                      torch.tensor([4, 5, 6, 7]).expand(len(x), 4))),
            (steer_experts(s, {2: {0: 50.0}}), lambda i: (i == 0).any(-1).all())]:
        mlp.used.clear()
        with intervention:
            inside = routing(s, x)
        indices, scores = mlp.used[-1]
        assert check(indices) and check(inside.indices[2])
        assert torch.equal(inside.indices[2], indices) and torch.equal(inside.weights[2], scores)
        assert torch.equal(inside.logits[:2], outside.logits[:2])
        assert torch.equal(logits(s, x), before) and state(s.model) == snapshot
    assert not fired
    for h in handles:
        h.remove()


def test_mxfp4_preset():
    """The mxfp4 fixture on this CPU (the packed path: transformers' MLP and router, packed experts)."""
    s = session("gpt_oss", "mxfp4")
    x = ids(s)
    before = logits(s, x)
    with ablate_experts(s, {3: [0, 1]}):
        r = routing(s, x)
        with ExpertsInput(s) as received:
            logits(s, x)
    assert not torch.isin(r.indices[3], torch.tensor([0, 1])).any()
    assert torch.equal(received.seen[3].cpu(), r.indices[3])
    assert torch.equal(logits(s, x), before)


# ---- attention: heads and sinks ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_ablate_heads_zeroes_exactly_those_slices(family):
    s = session(family)
    x = ids(s)
    before, snapshot = logits(s, x), state(s.model)
    o_proj = s.adapter.attention_module(s.model, 1).o_proj
    seen = []
    observe = lambda module, args: seen.append(args[0].detach().clone())  # noqa: E731
    h = o_proj.register_forward_pre_hook(observe)
    logits(s, x)
    h.remove()
    with ablate_heads(s, {1: [0, 3]}):
        h = o_proj.register_forward_pre_hook(observe)  # after ours: sees what o_proj receives
        inside = logits(s, x)
        h.remove()
    assert torch.equal(logits(s, x), before) and state(s.model) == snapshot
    assert not torch.equal(inside, before)
    outside, ablated = (t.view(1, len(x), 4, 16) for t in seen)
    assert (ablated[:, :, [0, 3]] == 0).all()
    assert torch.equal(ablated[:, :, [1, 2]], outside[:, :, [1, 2]])


def test_ablate_heads_on_a_dense_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(config).eval()
    s = types.SimpleNamespace(model=model, adapter=LLAMA_LIKE)  # interventions need only model + adapter
    x = list(range(10))
    before = logits(s, x)
    with ablate_heads(s, {0: [2]}):
        assert not torch.equal(logits(s, x), before)
    assert torch.equal(logits(s, x), before)
    with pytest.raises(InterventionError, match="dense model"):
        ablate_experts(s, {0: [1]})
    with pytest.raises(InterventionError, match="dense has no attention sinks"):
        scale_sinks(s, {0: 0.0})


def test_scale_sinks_changes_sink_mass_and_restores():
    s = session("gpt_oss")
    x = ids(s)
    before, snapshot = logits(s, x), state(s.model)
    sinks = s.model.model.layers[1].self_attn.sinks
    outside = s.trace(x, what=["attention"], dtype=torch.float32)
    with scale_sinks(s, {1: 0.0}):
        inside = s.trace(x, what=["attention"], dtype=torch.float32)
        assert not torch.equal(logits(s, x), before)
    with scale_sinks(s, {1: 1.0}):
        assert torch.equal(logits(s, x), before)  # x 1.0 changes nothing
    assert s.model.model.layers[1].self_attn.sinks is sinks and torch.equal(logits(s, x), before)
    assert state(s.model) == snapshot
    assert torch.equal(inside.sink_mass[0], outside.sink_mass[0])  # layer 0 untouched
    assert not torch.allclose(inside.sink_mass[1], outside.sink_mass[1])
    # a zero sink logit takes exp(0) / (exp(0) + sum exp(scores)) of each row: recomputed from the trace
    assert torch.allclose(inside.sink_mass[1] + inside.attention(1).sum(-1), torch.ones(4, len(x)), atol=1e-6)
    assert (inside.sink_mass[1] > 0).all()


# ---- around chat, stream, and a running generation -----------------------------------------------------------
def test_chat_and_stream_inside_interventions():
    s = session("gpt_oss")
    prompt = "Hello there"
    plain = s.chat(prompt, temperature=0, max_new_tokens=8)
    strong = force_experts(s, {layer: [4, 5, 6, 7] for layer in range(4)})
    with strong:
        forced = s.chat(prompt, temperature=0, max_new_tokens=8)
        run = s.stream(prompt, temperature=0, max_new_tokens=8)
        streamed = "".join(d.text for d in run)
        assert run.result().token_ids == forced.token_ids
    assert forced.token_ids != plain.token_ids and forced.text != plain.text
    assert streamed == "".join(forced.tokens)
    # a generation started inside and left running is waited for on exit: all its tokens saw the intervention
    with strong:
        run = s.stream(prompt, temperature=0, max_new_tokens=8)
    assert not run.running and run.result().token_ids == forced.token_ids
    assert s.chat(prompt, temperature=0, max_new_tokens=8).token_ids == plain.token_ids


def test_entering_while_a_generation_runs_is_refused():
    s = session("gpt_oss")
    s._busy.acquire()  # as a running generation holds it
    try:
        with pytest.raises(BusyError, match="generation is running"):
            with ablate_experts(s, {0: [1]}):
                pass
    finally:
        s._busy.release()
    assert not router_transforms(s.adapter.mlp_module(s.model, 0))


# ---- compare ---------------------------------------------------------------------------------------------------
def test_compare_texts_kl_and_routing_diff():
    s = session("gpt_oss")
    prompt = "The capital of France"
    ablate = ablate_experts(s, {1: [0, 1, 2]})
    forced_and_heads = [force_experts(s, {2: [0, 1, 2, 3]}), ablate_heads(s, {0: [1]})]
    r = compare(s, prompt, interventions=[[], ablate, forced_and_heads], max_new_tokens=6)
    assert r.labels[:2] == ["baseline", "no intervention"] and len(r.labels) == 4
    assert r.labels[2] == "ablate_experts({1: [0, 1, 2]})"
    assert r.labels[3] == "force_experts({2: [0, 1, 2, 3]}) + ablate_heads({0: [1]})"
    assert set(r.texts) == set(r.labels) and all(isinstance(t, str) for t in r.texts.values())
    n = len(r.generations["baseline"].token_ids)
    assert len(r.tokens) == n
    for label in r.labels:
        assert r.kl[label].shape == (n,) and (r.kl[label] >= 0).all()
    assert (r.kl["no intervention"] == 0).all() and r.routing_diff("no intervention") == 0.0
    assert r.texts["no intervention"] == r.texts["baseline"]
    assert r.kl[r.labels[2]].sum() > 0 and r.kl[r.labels[3]].sum() > 0
    # the routing diff is what traces of the baseline's tokens show, inside and outside each variant
    g = r.generations["baseline"]
    outside = s.trace(g, what=["routing"]).routing
    for label, group in [(r.labels[2], [ablate]), (r.labels[3], forced_and_heads)]:
        with contextlib.ExitStack() as stack:
            for c in group:
                stack.enter_context(c)
            inside = s.trace(g, what=["routing"]).routing
        changed = (inside.indices.sort(-1).values != outside.indices.sort(-1).values).any(-1)
        assert torch.equal(r.routing_changed[label], changed)
        assert r.routing_diff(label) == changed.float().mean().item() > 0
    assert r.routing_layers == [0, 1, 2, 3]
    # layer 2 is forced for every token: its routing changed wherever the baseline's set was not {0, 1, 2, 3}
    forced_changed = r.routing_changed[r.labels[3]][2]
    assert torch.equal(forced_changed, (outside.indices[2].sort(-1).values != torch.arange(4)).any(-1))
    assert "mean KL" in repr(r) and "<table>" in r._repr_html_()
    labelled = compare(s, prompt, interventions={"mine": ablate}, max_new_tokens=2)
    assert labelled.labels == ["baseline", "mine"]


def test_compare_rejects_what_is_not_an_intervention():
    s = session("gpt_oss")
    with pytest.raises(InterventionError, match="compare takes interventions"):
        compare(s, "hi", interventions=["ablate"], max_new_tokens=1)


# ---- errors name the valid range -------------------------------------------------------------------------------
def test_errors_name_the_valid_range():
    s, q3, mx = session("gpt_oss"), session("qwen3_moe"), session("mixtral")
    assert issubclass(InterventionError, WorkbenchError) and issubclass(InterventionError, ValueError)
    cases = [
        (lambda: ablate_experts(s, {30: [1]}), r"layer 30 is out of range: this model has layers 0\.\.3 \(MoE layers 0\.\.3\)"),
        (lambda: ablate_experts(q3, {1: [1]}), r"layer 1 has a dense MLP \(no router\): this model's routed \(MoE\) "
                                               r"layers are 0, 2"),
        (lambda: ablate_experts(q3, {5: [1]}), r"layer 5 is out of range: this model has layers 0\.\.2 \(MoE layers 0, 2\)"),
        (lambda: ablate_experts(s, {0: [8]}), r"expert 8 \(layer 0\) is out of range: this model has experts 0\.\.7"),
        (lambda: ablate_experts(s, {0: [-9]}), r"expert -9 \(layer 0\) is out of range"),
        (lambda: ablate_experts(s, {0: [True]}), r"expert must be an integer"),
        (lambda: ablate_experts(s, [0]), r"dict keyed by layer"),
        (lambda: force_experts(s, {0: [0, 1]}), r"exactly 4 distinct experts per layer"),
        (lambda: force_experts(s, {0: [0, 0, 1, 2]}), r"exactly 4 distinct experts"),
        (lambda: steer_experts(s, {0: {1: float("nan")}}), r"must be a finite number"),
        (lambda: steer_experts(s, {0: [1]}), r"steer_experts takes \{layer: \{expert: amount\}\}"),
        (lambda: ablate_heads(s, {0: [4]}), r"head 4 \(layer 0\) is out of range: this model has heads 0\.\.3"),
        (lambda: ablate_heads(s, {9: [0]}), r"layer 9 is out of range: this model has layers 0\.\.3"),
        (lambda: scale_sinks(mx, {0: 0.0}), r"mixtral has no attention sinks"),
        (lambda: scale_sinks(s, {0: float("inf")}), r"must be a finite number"),
    ]
    for make, match in cases:
        with pytest.raises(InterventionError, match=match):
            make()
    with pytest.raises(InterventionError, match=r"leaves 3 expert\(s\) at layer 0"):
        with ablate_experts(s, {0: [0, 1, 2, 3, 4]}):
            pass
    assert not router_transforms(s.adapter.mlp_module(s.model, 0))
