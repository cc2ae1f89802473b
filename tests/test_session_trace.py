"""Session.trace / Session.capture: the user-facing surface of the capture core."""
import pytest
import torch

import workbench as wb


def test_trace_of_a_generation_equals_a_fresh_trace_of_its_ids(tiny_checkpoint, tmp_path):
    s = wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")
    g = s.chat("Why is the sky blue?", reasoning_effort="low", temperature=0, max_new_tokens=12)
    t = s.trace(g)
    fresh = s.trace(list(g.prompt_ids) + list(g.token_ids))
    assert t.tokens.ids == fresh.tokens.ids
    assert t.tokens.channels[len(g.prompt_ids):] == list(g.token_channels)
    assert torch.equal(t.routing.indices, fresh.routing.indices)
    assert torch.equal(t.routing.weights, fresh.routing.weights)
    for layer in range(s.model.config.num_hidden_layers):
        assert torch.equal(t.attention(layer), fresh.attention(layer))
    # gpt-oss: every query's probability is shared between the keys and the sink
    rows = t.attention(1).sum(-1)
    assert torch.allclose(rows + t.sink_mass[1], torch.ones_like(rows), atol=1e-3)

    path = tmp_path / "run.wbtrace"
    t.save(path)
    loaded = wb.Trace.load(path, model=s.model)
    assert torch.equal(loaded.routing.logits, t.routing.logits)


def test_session_capture_around_the_users_own_forward(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("mixtral")), preset="cpu")
    ids = torch.tensor([s.tokenizer.encode("the cat sat on the mat")])
    with torch.no_grad():
        plain = s.model(ids).logits
        with s.capture(what=["routing"]) as cap:
            captured = s.model(ids).logits
    assert torch.equal(plain, captured)
    t = cap.trace(s.tokenizer)
    assert t.routing.indices.shape[1] == ids.shape[1]


def test_tracing_while_a_generation_runs_is_refused(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("olmoe")), preset="cpu")
    run = s.stream("hello", max_new_tokens=1000, temperature=1.0, seed=0)
    try:
        next(iter(run))  # generation is under way: 999 tokens to go
        with pytest.raises(wb.BusyError, match="generation is running"):
            s.trace("hello")
    finally:
        run.stop()
        run.result()
    assert s.trace("hello").routing is not None  # usable again


def test_session_interventions_and_compare(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")
    before = s.trace("the cat sat on the mat")
    banned = int(before.routing.indices[0, 0, 0])
    with s.ablate_experts({0: [banned]}):
        inside = s.trace("the cat sat on the mat")
    assert not (inside.routing.indices[0] == banned).any()
    assert torch.equal(s.trace("the cat sat on the mat").routing.indices, before.routing.indices)  # undone
    r = s.compare("the cat", interventions={"nothing": [], "ablated": [s.ablate_experts({0: [banned]})]},
                  max_new_tokens=4)
    assert r.labels == ["baseline", "nothing", "ablated"]
    # a variant that changes nothing is measured, not assumed: its KL is computed and exactly 0, routing unchanged
    assert len(r.kl["nothing"]) == 4 and float(r.kl["nothing"].max()) == 0.0
    assert not r.routing_changed["nothing"].any()
    # the ablated expert was the first choice of the first token: routing there must have changed
    assert r.routing_changed["ablated"][0].any() and float(r.kl["ablated"].max()) > 0.0
    # the README names a variant "baseline": it is the built-in run, never a renamed copy
    r = s.compare("the cat", interventions={"baseline": [], "ablated": [s.ablate_experts({0: [banned]})]},
                  max_new_tokens=4)
    assert r.labels == ["baseline", "ablated"]
    with pytest.raises(wb.InterventionError, match="'baseline' names the run without interventions"):
        s.compare("the cat", interventions={"baseline": [s.ablate_experts({0: [banned]})]}, max_new_tokens=4)


def test_stop_tokens_empty_writes_exactly_max_new_tokens(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")
    g = s.chat("hi", temperature=0, max_new_tokens=9, stop_tokens=[])
    assert len(g.token_ids) == 9 and g.finish_reason == "length"
