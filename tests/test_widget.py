"""The generation widget, driven from Python (no browser): streaming panes, stop, errors, refusals,
history, the token inspector's values against Generation and Trace, and no thread left behind.

Fast tests use the tiny random gpt-oss with a "script": a hook on lm_head that adds a large logit to the
next token of a fixed harmony completion, so the random model writes real analysis and final channels
(greedy; logprobs stay the model's own, just dominated by the script). Slow tests use SmolLM2.
"""
import contextlib
import html
import math
import threading
import time

import pytest
import torch

import workbench as wb
from workbench.errors import InterventionError
from workbench.inspect import capture as tracing
from workbench.ui.inspector import MEAN, PAGE_SIZE
from workbench.ui.widget import GenerationWidget, widget

HARMONY_SCRIPT = ("<|channel|>analysis<|message|>The user greets me. I greet back.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Hello to you!<|return|>")


@pytest.fixture(scope="module")
def gpt_oss(tiny_checkpoint):
    return wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")


@contextlib.contextmanager
def scripted(session, text=HARMONY_SCRIPT, delay=0.0):
    """Make the model write `text` (then anything), optionally `delay` seconds per step."""
    script = session.tokenizer.encode(text, add_special_tokens=False)
    state = {"step": 0, "calls": 0}

    def hook(module, args, logits):
        if logits.shape[1] > 1:  # a prefill (or a trace): the completion starts over
            state["step"] = 0
        if state["step"] < len(script):
            logits[:, -1, script[state["step"]]] += 50.0
        state["step"] += 1
        state["calls"] += 1
        if delay:
            time.sleep(delay)
        return logits

    handle = session.model.lm_head.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def our_threads():
    return [t for t in threading.enumerate() if t.name in ("workbench-generate", "workbench-widget")]


@pytest.fixture
def w(gpt_oss):
    w = widget(gpt_oss, temperature=0.0, max_new_tokens=60)
    yield w
    w.close()
    assert not our_threads()


# ---- generation and panes -------------------------------------------------------------------------------

def test_generate_fills_harmony_panes(w, gpt_oss):
    with scripted(gpt_oss):
        assert w.generate("Hi there")
        g = w.wait(timeout=60)
    assert g.finish_reason == "stop"
    assert g.channels == {"analysis": "The user greets me. I greet back.", "final": "Hello to you!"}
    assert w.final_text == g.text == g.channels["final"]
    assert html.escape(g.text) in w.final_pane.value
    assert w.analysis_text == g.channels["analysis"] and html.escape(g.channels["analysis"]) in w.analysis_pane.value
    assert w.analysis.layout.display == ""  # the analysis pane shows (collapsible, dimmed)
    assert not w.running and not w.generate_button.disabled and w.stop_button.disabled
    assert w.token_count == len(g.token_ids) and f"{len(g.token_ids)} tokens" in w.status
    assert w.error == "" and w.error_area.layout.display == "none"
    assert w.reasoning.layout.display == "" and not w.reasoning.disabled  # harmony: reasoning effort offered
    assert w.prompt.value == ""  # the prompt moved into the history


def test_history_goes_back_with_thinking_and_clear_empties_it(w, gpt_oss):
    with scripted(gpt_oss):
        w.generate("Hi there")
        w.wait(timeout=60)
        assert w.history == [{"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello to you!",
                              "thinking": "The user greets me. I greet back."}]
        w.generate("And again?")
        g2 = w.wait(timeout=60)
    expected = gpt_oss.render(w.history[:3], reasoning_effort=w.reasoning.value)
    assert g2.prompt_ids == expected  # the conversation, rendered through the chat template
    assert "Hello to you!" in gpt_oss.tokenizer.decode(g2.prompt_ids)
    assert len(w.history) == 4 and "And again?" in w.history_view.value
    assert w.clear()
    assert w.history == [] and w.final_text == "" and w.history_view.value == "" and w.inspector.generation is None


def test_options_reach_the_session(w, gpt_oss):
    w.system.value, w.developer.value, w.reasoning.value, w.seed.value = "You are terse.", "Answer in French.", \
        "high", "7"
    assert w.options() == dict(temperature=0.0, top_p=1.0, max_new_tokens=60, seed=7, system="You are terse.",
                               reasoning_effort="high", developer="Answer in French.")
    w.generate("Hi")
    g = w.wait(timeout=60)
    text = gpt_oss.tokenizer.decode(g.prompt_ids)
    assert "You are terse." in text and "Answer in French." in text and "Reasoning: high" in text
    assert g.params.seed == 7


def test_updates_are_batched(gpt_oss):
    w = widget(gpt_oss, temperature=0.0, max_new_tokens=40)
    w.flush_interval = 60.0  # nothing between the first delta and the end
    changes = []
    w.observe(lambda ch: changes.append(ch["new"]), "final_text")
    try:
        w.generate("Hi")
        g = w.wait(timeout=60)
    finally:
        w.close()
    assert len(g.token_ids) == 40 and len(changes) <= 3  # reset, first flush, final
    assert changes[-1] == g.text


# ---- stop, refusal, errors, close ----------------------------------------------------------------------

def test_stop_mid_stream(w, gpt_oss):
    w.max_new_tokens.value = 400
    with scripted(gpt_oss, delay=0.02) as state:
        w.generate("Tell me everything")
        wait_for(lambda: w.token_count >= 5)
        w.stop()
        calls_at_stop = state["calls"]
        g = w.wait(timeout=60)
    assert g.finish_reason == "stopped" and "stopped" in w.status
    assert 5 <= len(g.token_ids) < 400
    assert len(g.token_ids) <= calls_at_stop + 1  # ended within the token being computed at stop()
    assert not w.running and not w.generate_button.disabled


def test_second_generate_is_refused_visibly(w, gpt_oss):
    w.max_new_tokens.value = 400
    with scripted(gpt_oss, delay=0.02):
        assert w.generate("first")
        wait_for(lambda: w.token_count >= 1)
        assert w.generate_button.disabled and not w.stop_button.disabled
        assert not w.generate("second")
        assert "already running" in w.error and w.error_area.layout.display == ""
        assert "already running" in w.error_area.value
        w.stop()
        w.wait(timeout=60)
    assert w.error == ""  # the refusal no longer applies once the run has ended
    assert [m["content"] for m in w.history if m["role"] == "user"] == ["first"]


def test_busy_session_is_refused(w, gpt_oss):
    with scripted(gpt_oss, delay=0.02):
        run = gpt_oss.stream("elsewhere", max_new_tokens=200)  # e.g. another cell
        try:
            assert not w.generate("Hi")
            assert "already running" in w.error and not w.running
        finally:
            run.stop()
            run.result()


def test_errors_show_in_the_widget_and_it_stays_usable(w, gpt_oss):
    w.max_new_tokens.value = 10**6  # past the 131,072-token context
    assert not w.generate("Hi")
    assert w.error.startswith("ContextLengthError") and w.error_area.layout.display == ""
    assert "context" in html.unescape(w.error_area.value)
    assert w.prompt.value == "Hi" and not w.running  # nothing lost
    w.max_new_tokens.value, w.seed.value = 10, "abc"
    assert not w.generate() and w.error.startswith("SamplingError") and "seed" in w.error
    w.seed.value, w.top_p.value = "", 1.0
    w.temperature.value = 0.0
    assert w.generate()
    g = w.wait(timeout=60)
    assert len(g.token_ids) == 10 and w.error == "" and w.error_area.layout.display == "none"


def test_close_mid_run_leaves_no_thread(gpt_oss):
    w = widget(gpt_oss, temperature=0.0, max_new_tokens=400)
    with scripted(gpt_oss, delay=0.02):
        w.generate("Hi")
        wait_for(lambda: w.token_count >= 2)
        assert our_threads()
        w.close()
    assert not our_threads()
    assert gpt_oss._busy.acquire(blocking=False)  # the session is free again
    gpt_oss._busy.release()


def test_closed_widgets_leave_no_widget_objects_behind(gpt_oss):
    """Each widget makes ~330 ipywidgets objects (controls, their Layouts and Styles, the inspector's chips);
    close() must close them all, or ipywidgets' registry keeps them (and what they hold) for the kernel's life."""
    import gc

    from workbench.ui.closing import live_widgets

    gc.collect()
    start = live_widgets()
    for k in range(5):
        w = widget(gpt_oss, temperature=0.0, max_new_tokens=12)
        assert live_widgets() > start + 100
        if k == 0:  # one that used everything: a generation, a selected token's figures, interventions rows
            w.interventions.add("ablate experts", 1, "7")
            w.interventions.add("scale sinks", 0, "0.5", on=False)
            w.interventions.rows[-1].remove_button.click()
            w.generate("Hi")
            w.wait(timeout=60)
            w.inspector.select_token(0)
            assert w.inspector.experts_out.outputs and w.inspector.attention_out.outputs
        w.close()
        assert live_widgets() == start, f"widget {k}: {live_widgets() - start} widget objects left alive"
    assert w.inspector.trace is None  # a closed widget kept in a variable lets go of its trace


# ---- inspector ------------------------------------------------------------------------------------------

def test_inspector_values_equal_generation_and_trace(w, gpt_oss):
    with scripted(gpt_oss):
        w.generate("Hi there")
        g = w.wait(timeout=60)
    ins = w.inspector
    n = len(g.token_ids)
    chips = [c for c in ins.chips if c.layout.display != "none"]
    assert len(chips) == min(n, PAGE_SIZE) and ins.slider.max == n - 1
    assert chips[0].tooltip.startswith(f"#0 p={math.exp(g.logprobs[0]):.3f}")

    i = g.token_channels.index("final")  # first token of the answer
    chips[i].click()  # what a click in the browser does
    assert ins.selected == i and ins.slider.value == i
    assert ins.alternatives == g.alternatives[i] and len(ins.alternatives) == 5
    for tid, _, lp in g.alternatives[i]:
        assert f"<td>{tid}</td>" in ins.details.value and f"{math.exp(lp):.4f}" in ins.details.value

    t = ins.trace
    reference = tracing.trace(gpt_oss.model, gpt_oss.tokenizer, gpt_oss.adapter, g)
    q = len(g.prompt_ids) + i - 1  # the step that chose token i
    assert t.tokens.ids == reference.tokens.ids == g.prompt_ids + g.token_ids

    # experts: routing weights of position q, layers x experts
    z = torch.tensor(ins.experts_fig.data[0].z)
    expected = torch.zeros(len(t.routing.layers), t.routing.logits.shape[-1])
    expected.scatter_(1, t.routing.indices[:, q], t.routing.weights[:, q].float())
    assert torch.equal(z, expected)
    assert torch.equal(t.routing.indices[:, q], reference.routing.indices[:, q])

    # attention: default is the last layer, mean over heads; then one head of another layer
    assert ins.layer.value == t.layers[-1] and ins.head.value == MEAN
    mean = sum(t.attention(t.layers[-1], h)[q, :q + 1] for h in t.heads) / len(t.heads)
    assert torch.allclose(torch.tensor(ins.attention_fig.data[0].y), mean, atol=0, rtol=0)
    ins.layer.value, ins.head.value = 0, 1
    y = torch.tensor(ins.attention_fig.data[0].y)
    assert torch.equal(y, t.attention(0, 1)[q, :q + 1]) and len(y) == q + 1
    assert torch.equal(y, reference.attention(0, 1)[q, :q + 1])
    assert ins.attention_out.outputs and "application/vnd.plotly.v1+json" in ins.attention_out.outputs[0]["data"]

    ins.slider.value = i + 1  # the slider selects too; the trace is cached (one per generation)
    assert ins.selected == i + 1 and ins.trace is t and ins.alternatives == g.alternatives[i + 1]
    with pytest.raises(IndexError):
        ins.select_token(n)


def test_inspector_pages_long_outputs(gpt_oss, monkeypatch):
    # A random model may write a stop token at any step: no stop tokens, so the length is what we asked for.
    stream = gpt_oss.stream
    monkeypatch.setattr(gpt_oss, "stream", lambda *args, **kwargs: stream(*args, stop_tokens=[], **kwargs))
    w = widget(gpt_oss, temperature=0.0, max_new_tokens=PAGE_SIZE + 10)
    try:
        w.generate("Hi")
        g = w.wait(timeout=60)
        ins = w.inspector
        assert len(g.token_ids) == PAGE_SIZE + 10 and ins.page_label.value == "page 1/2"
        ins.select_token(PAGE_SIZE + 3)
        assert ins.page == 1 and sum(c.layout.display != "none" for c in ins.chips) == 10
        assert ins.chips[3].layout.border.startswith("2px")  # the selected chip is marked
    finally:
        w.close()


def test_inspector_degrades_without_a_trace(w, gpt_oss, monkeypatch):
    w.generate("Hi")
    g = w.wait(timeout=60)

    def broken(*a, **k):
        raise wb.CaptureBudgetError("too big for the budget")

    monkeypatch.setattr(tracing, "trace", broken)
    w.inspector.select_token(0)
    assert w.inspector.alternatives == g.alternatives[0]  # alternatives still shown
    assert w.inspector.trace is None and w.inspector.attention_fig is None and w.inspector.experts_fig is None
    assert "too big for the budget" in w.inspector.trace_note.value


def test_inspector_waits_for_a_running_generation(w, gpt_oss):
    w.generate("Hi")
    w.wait(timeout=60)
    with scripted(gpt_oss, delay=0.02):
        run = gpt_oss.stream("elsewhere", max_new_tokens=200)  # another cell generating on the session
        try:
            w.inspector.select_token(0)
            assert w.inspector.trace is None and "BusyError" in w.inspector.trace_note.value
        finally:
            run.stop()
            run.result()
    w.inspector.select_token(1)  # tried again once the session is free
    assert w.inspector.trace is not None and w.inspector.trace_note.value == ""


def test_plain_model_hides_reasoning(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("mixtral")), preset="cpu")
    w = widget(s, temperature=0.0, max_new_tokens=8, reasoning_effort="low")
    try:
        assert w.reasoning.disabled and w.reasoning.layout.display == "none"
        assert "reasoning_effort" not in w.options() and "developer" not in w.options()
        w.generate("Hi")
        g = w.wait(timeout=60)
        assert w.final_text == g.text and w.analysis.layout.display == "none"
        assert w.history[-1] == {"role": "assistant", "content": g.text}
    finally:
        w.close()


def test_unknown_option_is_an_error(gpt_oss):
    with pytest.raises(TypeError, match="temprature"):
        GenerationWidget(gpt_oss, temprature=0.5)


# ---- SmolLM2 (slow) -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_generate_stop_and_context_error(smollm2_session):
    s = smollm2_session
    w = widget(s, temperature=0.0, max_new_tokens=12)
    try:
        assert w.reasoning.layout.display == "none"
        w.generate("What is the capital of France?")
        g = w.wait(timeout=120)
        assert "Paris" in g.text and w.final_text == g.text and html.escape(g.text) in w.final_pane.value

        w.max_new_tokens.value = 200
        w.generate("Write a long story about a cat.")
        wait_for(lambda: w.token_count >= 3, timeout=120)
        w.stop()
        g = w.wait(timeout=120)
        assert g.finish_reason == "stopped" and len(g.token_ids) < 200

        w.max_new_tokens.value = 10
        assert not w.generate("word " * 9000)  # over SmolLM2's 8,192-token context
        assert "ContextLengthError" in w.error and w.error_area.layout.display == ""
        w.generate("Say hi.")
        g = w.wait(timeout=120)
        assert g.finish_reason in ("stop", "length") and w.error == ""

        w.inspector.select_token(0)  # dense model: attention, no experts
        t = w.inspector.trace
        assert t.routing is None and w.inspector.experts_fig is None
        q = len(g.prompt_ids) - 1
        w.inspector.head.value = 0
        assert torch.equal(torch.tensor(w.inspector.attention_fig.data[0].y), t.attention(t.layers[-1], 0)[q, :q + 1])
    finally:
        w.close()
    assert not our_threads()


# ---- interventions panel --------------------------------------------------------------------------------

def forward_logits(session, text="The sky is blue because"):
    ids = torch.tensor([session.tokenizer.encode(text)])
    with torch.no_grad():
        return session.model(ids).logits


def test_interventions_panel_rows_and_parsing(w, gpt_oss):
    panel = w.interventions
    assert panel in w.children and panel.selected_index is None  # collapsible, collapsed at first
    assert panel.kinds == ["ablate experts", "force experts", "steer experts", "ablate heads", "scale sinks"]
    assert panel.active() == [] and "none active" in panel.summary.value
    panel.add("ablate experts", 1, "7, 2")
    steer = panel.add("steer_experts", 2, "7:+2.0, 3:-1")
    panel.add("ablate heads", 3, [0, 3])
    sinks = panel.add("scale sinks", 0, 0.5, on=False)
    assert panel.active() == [("ablate_experts", {1: [7, 2]}), ("steer_experts", {2: {7: 2.0, 3: -1.0}}),
                              ("ablate_heads", {3: [0, 3]})]
    assert "ablate experts L1: 7, 2" in panel.summary.value and "scale sinks" not in panel.summary.value
    assert panel.get_title(0) == "interventions (3 on)"
    sinks.on.value = True  # the checkbox, as a click sets it
    assert panel.active()[-1] == ("scale_sinks", {0: 0.5}) and "scale sinks L0: 0.5" in panel.summary.value
    assert [i.spec for i in panel.build()] == [{1: [2, 7]}, {2: {7: 2.0, 3: -1.0}}, {3: [0, 3]}, {0: 0.5}]
    steer.remove_button.click()
    assert len(panel.rows) == 3 and all(name != "steer_experts" for name, _ in panel.active())
    panel.add("force experts", 0, "1 2 3")
    with pytest.raises(InterventionError, match="exactly 4"):
        panel.build()
    panel.rows[-1].values.value = "1, x"
    with pytest.raises(InterventionError, match=r"row 4 .*cannot read '1, x'"):
        panel.active()
    with pytest.raises(InterventionError, match="unknown intervention kind"):
        panel.add("ablate neurons", 0, "1")
    panel.clear()
    assert panel.rows == [] and panel.active() == [] and "none active" in panel.summary.value
    panel.add_button.click()  # a blank row of the first kind
    assert panel.rows[0].kind.value == "ablate experts" and panel.rows[0].on.value


def test_interventions_panel_offers_only_kinds_the_model_has(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("mixtral")), preset="cpu")
    w = widget(s)
    try:
        assert w.interventions.kinds == ["ablate experts", "force experts", "steer experts", "ablate heads"]
        with pytest.raises(InterventionError, match="scale sinks does not apply"):
            w.interventions.add("scale sinks", 0, "0.5")
    finally:
        w.close()


def test_ablated_experts_are_never_routed_and_the_model_is_restored(w, gpt_oss):
    layer, ablated = 1, [0, 1]
    before = forward_logits(gpt_oss)
    w.max_new_tokens.value = 20
    w.generate("Hi there")
    g0 = w.wait(timeout=60)
    w.inspector.select_token(0)
    base = w.inspector.trace
    row = base.routing.layers.index(layer)
    assert any(e in base.routing.indices[row] for e in ablated)  # without the intervention they are used
    assert w.generation_interventions == [] and w.inspector.interventions == ()

    w.clear()
    r = w.interventions.add("ablate experts", layer, "0, 1")
    assert w.generate("Hi there")
    g1 = w.wait(timeout=60)
    assert w.error == "" and g1.token_ids != g0.token_ids  # the ablation changed the answer
    assert w.generation_interventions == [("ablate_experts", {layer: ablated})]
    for mlp in (gpt_oss.adapter.mlp_module(gpt_oss.model, i) for i in range(4)):  # undone once the run ended
        assert "_workbench_router_transforms" not in mlp.__dict__ and "forward" not in mlp.__dict__
    assert torch.equal(forward_logits(gpt_oss), before)

    w.inspector.select_token(3)  # the inspector's trace replays the generation with its interventions
    t = w.inspector.trace
    assert t is not None and t.tokens.ids == g1.prompt_ids + g1.token_ids
    used = t.routing.indices[row]
    assert not any((used == e).any() for e in ablated)  # never, at any position
    z = torch.tensor(w.inspector.experts_fig.data[0].z)
    assert torch.all(z[row, ablated] == 0) and z[row].sum() > 0
    assert "ablate_experts" in w.inspector.trace_note.value
    assert torch.equal(forward_logits(gpt_oss), before)  # and undone after the trace too

    w.clear()
    r.on.value = False  # the row stays, switched off: the baseline answer again
    assert w.interventions.active() == [] and w.generate("Hi there")
    g2 = w.wait(timeout=60)
    assert g2.token_ids == g0.token_ids and g2.text == g0.text and w.generation_interventions == []
    w.inspector.select_token(0)
    assert torch.equal(w.inspector.trace.routing.indices, base.routing.indices)
    assert torch.equal(forward_logits(gpt_oss), before)


def test_bad_intervention_row_shows_the_range_and_runs_nothing(w, gpt_oss):
    before = forward_logits(gpt_oss)
    w.interventions.add("ablate heads", 0, "1")  # valid, entered first: must be undone again
    w.interventions.add("ablate experts", 9, "3")
    with scripted(gpt_oss) as state:
        assert not w.generate("Hi")
    assert state["calls"] == 0 and not w.running and w.generation is None and not our_threads()
    assert w.error.startswith("InterventionError") and "row 2" in w.error and "0..3" in w.error
    assert w.error_area.layout.display == "" and "0..3" in w.error_area.value
    assert w.prompt.value == "Hi" and w.history == []  # nothing lost
    w.interventions.rows[1].layer.value = 1
    w.interventions.rows[1].values.value = "3, 8"
    assert not w.generate() and "expert 8" in w.error and "0..7" in w.error
    assert gpt_oss._busy.acquire(blocking=False)  # the session is free
    gpt_oss._busy.release()
    attention = gpt_oss.adapter.attention_module(gpt_oss.model, 0)
    assert not attention.o_proj._forward_pre_hooks
    assert torch.equal(forward_logits(gpt_oss), before)


def test_interventions_are_undone_after_stop(w, gpt_oss):
    before = forward_logits(gpt_oss)
    attention = gpt_oss.adapter.attention_module(gpt_oss.model, 2)
    sinks, mlp = attention.sinks, gpt_oss.adapter.mlp_module(gpt_oss.model, 2)
    w.interventions.add("scale sinks", 2, "0.0")
    w.interventions.add("steer experts", 2, "5:+3, 6:-1")
    w.interventions.add("ablate heads", 2, "1")
    w.max_new_tokens.value = 400
    with scripted(gpt_oss, delay=0.02):
        assert w.generate("Tell me everything")
        wait_for(lambda: w.token_count >= 3)
        assert attention.sinks is not sinks and "_workbench_router_transforms" in mlp.__dict__  # active
        w.stop()
        g = w.wait(timeout=60)
    assert g.finish_reason == "stopped" and len(w.generation_interventions) == 3
    assert attention.sinks is sinks and "_workbench_router_transforms" not in mlp.__dict__
    assert not attention.o_proj._forward_pre_hooks
    assert torch.equal(forward_logits(gpt_oss), before)
