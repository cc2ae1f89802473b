"""Activation patching equals an independent implementation (plain PyTorch forward hooks, one unbatched forward
per site, the model's modules addressed directly, full logits), on SmolLM2 and on gpt-oss (tiny random; the
trained nano when present); patching with a run's own values changes nothing; patching all of layer 0 gives the
clean run; the cost is said before running; bad requests get errors that say what to do; the model is
bit-identical afterwards.

Tolerance (float32 models): the batched patched forwards (8 rows) against the reference's one-row forwards
agree to ATOL on the metric (a logit difference), because matrix products of other shapes can round the
last bits differently; with batch_size=1 every forward has the reference's shape.
"""
from __future__ import annotations

import math

import pytest
import torch

import workbench as wb
from workbench import fixtures
from workbench.chat import render
from workbench.errors import (
    CaptureBudgetError,
    PatchingBudgetError,
    PatchingError,
    WorkbenchError,
)
from workbench.intervene.patching import clean_cache, patched_logits
from workbench.views import patching_heatmap

ATOL = 2e-5  # on a logit difference (|metric| up to ~6 here), float32; measured at most 5.3e-6 (SmolLM2), 8.4e-7 (tiny)
SITES = ("residual", "mlp", "attention_heads", "experts")
IOI_CLEAN = "When John and Mary went to the store, John gave a drink to"    # -> " Mary"
IOI_CORRUPT = "When John and Mary went to the store, Mary gave a drink to"  # -> " John"
MOE_CLEAN, MOE_CORRUPT = "the cat sat on the mat", "the dog sat on the mat"
_sessions: dict = {}


def moe(name: str):
    if name not in _sessions:
        if name == "nano":
            try:
                path = fixtures.nano_path()
            except (ImportError, AttributeError, WorkbenchError) as e:
                pytest.skip(f"gpt-oss-nano not built here: {e}")
        else:
            path = fixtures.tiny_checkpoint("gpt_oss")
        _sessions[name] = wb.load(str(path), preset="cpu")
    return _sessions[name]


def full_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def state(model):
    """Hooks, instance attributes of modules, parameter objects: everything patching may touch."""
    hooks = {(n, kind, k) for n, m in model.named_modules()
             for kind, hs in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for k in hs}
    return hooks, {n: sorted(m.__dict__) for n, m in model.named_modules()}, {n: id(p) for n, p in model.named_parameters()}


def two_answers(s, ids) -> tuple[int, int]:
    """The clean run's two most likely next tokens (random models predict the same token for both prompts)."""
    top = full_logits(s.model, ids)[-1].topk(2).indices
    return int(top[0]), int(top[1])


# ---- the independent implementation: plain forward hooks, one site per forward ------------------------------
def _module(model, at, layer):
    block = model.model.layers[layer]
    return {"residual": block, "mlp": block.mlp, "attention_heads": block.self_attn.o_proj,
            "experts": getattr(block.mlp, "router", None)}[at]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def reference(model, at, clean_ids, corrupt_ids, sites, answers) -> dict:
    """{(layer, index): metric} with that one site of the corrupt run set to its clean value."""
    config = model.config
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    cache, handles = {}, []
    for layer in {layer for layer, _ in sites}:
        m = _module(model, at, layer)
        if at == "attention_heads":
            handles.append(m.register_forward_pre_hook(lambda mod, args, layer=layer: cache.__setitem__(layer, args[0][0].clone())))
        elif at == "experts":  # the router's logits, its first output: [tokens, experts]
            handles.append(m.register_forward_hook(lambda mod, args, out, layer=layer: cache.__setitem__(layer, out[0].clone())))
        else:  # the output (first element of a tuple): [1, tokens, hidden]
            handles.append(m.register_forward_hook(lambda mod, args, out, layer=layer: cache.__setitem__(layer, _first(out)[0].clone())))
    full_logits(model, clean_ids)
    for h in handles:
        h.remove()
    a, b = answers
    out = {}
    for layer, i in sites:
        m = _module(model, at, layer)
        clean = cache[layer]
        if at in ("residual", "mlp"):
            def hook(mod, args, output, i=i, clean=clean):
                x = _first(output).clone()
                x[0, i] = clean[i]
                return (x, *output[1:]) if isinstance(output, tuple) else x
            handle = m.register_forward_hook(hook)
        elif at == "attention_heads":
            def hook(mod, args, i=i, clean=clean):
                x = args[0].clone()
                x[0, :, i * head_dim:(i + 1) * head_dim] = clean[:, i * head_dim:(i + 1) * head_dim]
                return (x,)
            handle = m.register_forward_pre_hook(hook)
        else:  # gpt-oss's router: set the expert's logit, then its own top-k and softmax over the top k
            def hook(mod, args, output, i=i, clean=clean):
                logits = output[0].clone()
                logits[:, i] = clean[:, i]
                top, idx = torch.topk(logits, mod.top_k, dim=-1)
                return logits, torch.softmax(top, dim=1, dtype=top.dtype), idx
            handle = m.register_forward_hook(hook)
        try:
            last = full_logits(model, corrupt_ids)[-1]
        finally:
            handle.remove()
        out[(layer, i)] = float(last[a] - last[b])
    return out


def check_against_reference(s, clean, corrupt, at, layers, answers=None, subset=None):
    clean_ids, corrupt_ids = s.tokenizer(clean)["input_ids"], s.tokenizer(corrupt)["input_ids"]
    r = s.patch(clean, corrupt, at=at, layers=layers, answers=answers)
    answers = r.answers
    width = r.scores.shape[1]
    sites = [(layer, i) for layer in r.layers for i in range(width) if subset is None or i in subset]
    ref = reference(s.model, at, clean_ids, corrupt_ids, sites, answers)
    diffs = [abs(float(r.scores[r.layers.index(layer), i]) - v) for (layer, i), v in ref.items()]
    assert max(diffs) <= ATOL, (at, max(diffs))
    clean_last, corrupt_last = full_logits(s.model, clean_ids)[-1], full_logits(s.model, corrupt_ids)[-1]
    a, b = answers
    assert abs(r.clean - float(clean_last[a] - clean_last[b])) <= ATOL
    assert abs(r.corrupt - float(corrupt_last[a] - corrupt_last[b])) <= ATOL
    assert torch.allclose(r.normalized, (r.scores - r.corrupt) / (r.clean - r.corrupt))
    return r, max(diffs)


# ---- equality with the reference -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("at", ["residual", "mlp", "attention_heads"])
def test_smollm2_equals_plain_hooks(smollm2_session, at):
    s = smollm2_session
    before, snapshot = full_logits(s.model, s.tokenizer(IOI_CORRUPT)["input_ids"]), state(s.model)
    # every site of three layers against our run; the reference on a subset of positions for speed
    r, _ = check_against_reference(s, IOI_CLEAN, IOI_CORRUPT, at, [0, 15, -1],
                                      subset=None if at == "attention_heads" else {0, 9, 13})
    assert r.answer_strings == (" Mary", " John") and r.clean > 0 > r.corrupt
    assert torch.equal(full_logits(s.model, s.tokenizer(IOI_CORRUPT)["input_ids"]), before)
    assert state(s.model) == snapshot


@pytest.mark.parametrize("name", ["tiny", "nano"])
@pytest.mark.parametrize("at", SITES)
def test_gpt_oss_equals_plain_hooks(name, at):
    s = moe(name)
    clean_ids = s.tokenizer(MOE_CLEAN)["input_ids"]
    before, snapshot = full_logits(s.model, clean_ids), state(s.model)
    answers = two_answers(s, clean_ids)
    r, _ = check_against_reference(s, MOE_CLEAN, MOE_CORRUPT, at, None, answers=answers)
    assert r.layers == list(range(s.model.config.num_hidden_layers))
    width = {"residual": len(clean_ids), "mlp": len(clean_ids), "attention_heads": s.model.config.num_attention_heads,
             "experts": s.model.config.num_local_experts}[at]
    assert r.scores.shape == (len(r.layers), width) and len(r.sites) == width
    assert torch.equal(full_logits(s.model, clean_ids), before) and state(s.model) == snapshot


def test_batch_size_one_matches_the_reference_shape():
    """One-row patched forwards: every site kind equals the reference to 2e-6 (measured <= 8.4e-7; the reference
    computes every position's logits, we only the last one's)."""
    s = moe("tiny")
    ids_clean = s.tokenizer(MOE_CLEAN)["input_ids"]
    answers = two_answers(s, ids_clean)
    for at in SITES:
        r = s.patch(MOE_CLEAN, MOE_CORRUPT, at=at, layers=[1], answers=answers, batch_size=1)
        ref = reference(s.model, at, ids_clean, s.tokenizer(MOE_CORRUPT)["input_ids"],
                        [(1, i) for i in range(r.scores.shape[1])], answers)
        assert torch.allclose(r.scores[0], torch.tensor([ref[(1, i)] for i in range(r.scores.shape[1])]), atol=2e-6), at


# ---- properties that need no reference ---------------------------------------------------------------------
@pytest.mark.parametrize("at", SITES)
def test_patching_with_the_corrupt_runs_own_values_changes_nothing(at):
    s = moe("tiny")
    ids = s.tokenizer(MOE_CORRUPT)["input_ids"]
    answers = two_answers(s, ids)
    exact = s.patch(ids, ids, at=at, answers=answers, batch_size=1)
    assert exact.clean == exact.corrupt
    assert torch.equal(exact.scores, torch.full_like(exact.scores, exact.corrupt))  # same shapes: bit-equal
    assert torch.isnan(exact.normalized).all()  # 0/0: undefined, not silently 0
    batched = s.patch(ids, ids, at=at, answers=answers, batch_size=8)
    assert (batched.scores - batched.corrupt).abs().max() <= ATOL


def test_patching_all_of_layer_0_gives_the_clean_run_after_it():
    s = moe("tiny")
    clean_ids, corrupt_ids = s.tokenizer(MOE_CLEAN)["input_ids"], s.tokenizer(MOE_CORRUPT)["input_ids"]
    clean_last, cache = clean_cache(s.model, s.adapter, "residual", [0], clean_ids)
    seen, handles = {}, []
    for i, block in enumerate(s.model.model.layers):
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, _first(out)[0].clone())))
    try:
        patched = patched_logits(s.model, s.adapter, "residual", corrupt_ids, cache, [[(0, p) for p in range(len(clean_ids))]])
        patched_residuals = dict(seen)
        full_logits(s.model, clean_ids)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(patched[0], clean_last)  # one row, the clean forward's shapes: exactly the clean logits
    for i in range(1, len(s.model.model.layers)):
        assert torch.equal(patched_residuals[i], seen[i]), i


@pytest.mark.slow
def test_smollm2_last_layer_last_position_restores_the_clean_metric(smollm2_session):
    r = smollm2_session.patch(IOI_CLEAN, IOI_CORRUPT, at="residual", layers=[-1], batch_size=1)
    assert r.scores[0, -1] == r.clean and r.normalized[0, -1] == 1.0
    assert (r.scores[0, :-1] == r.corrupt).all()  # earlier positions cannot reach the last one after the last layer


def test_cost_is_said_before_running_and_counts_the_forwards():
    s = moe("tiny")
    ids = s.tokenizer(MOE_CLEAN)["input_ids"]
    cost = s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", layers=[0, 2, 3], batch_size=4, dry_run=True)
    assert (cost.sites, cost.batches, cost.forwards) == (3 * len(ids), math.ceil(3 * len(ids) / 4),
                                                          2 + math.ceil(3 * len(ids) / 4))
    assert cost.cached_bytes == 3 * len(ids) * s.model.config.hidden_size * 4  # float32
    experts = s.patch(MOE_CLEAN, MOE_CORRUPT, at="experts", dry_run=True)
    assert experts.cached_bytes == 4 * len(ids) * s.model.config.num_local_experts * 4
    assert experts.forwards == 2 + math.ceil(4 * 8 / 8)
    calls, answers = [], two_answers(s, ids)
    handle = s.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    try:
        s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", layers=[0, 2, 3], batch_size=4, answers=answers)
    finally:
        handle.remove()
    assert len(calls) == cost.forwards
    assert [c[0] for c in calls] == [1, 1] + [4] * (cost.batches - 1) + [3 * len(ids) - 4 * (cost.batches - 1)]


def test_a_metric_reads_any_position_and_causality_holds():
    """metric(logits [tokens, vocab]): a metric of position 1 is unchanged by patching any later position, and
    patching the last layer's output at position 1 gives the clean run's value there (the residual after the last
    layer decides that position's logits)."""
    s = moe("tiny")
    ids = s.tokenizer(MOE_CLEAN)["input_ids"]
    a, b = two_answers(s, ids)
    shapes = []

    def at_position_1(logits):
        shapes.append(tuple(logits.shape))
        return logits[1, a] - logits[1, b]

    last = s.model.config.num_hidden_layers - 1
    r = s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", metric=at_position_1, batch_size=1)
    assert set(shapes) == {(len(ids), s.model.config.vocab_size)}
    assert torch.equal(r.scores[:, 2:], torch.full_like(r.scores[:, 2:], r.corrupt))
    assert r.scores[last, 1].item() == pytest.approx(r.clean, abs=ATOL)
    assert r.clean != pytest.approx(r.corrupt, abs=1e-3)  # the two runs differ at position 1 (the changed word)
    with pytest.raises(PatchingError, match=r"metric must be a function of one run's logits \[tokens, vocab\]"):
        s.patch(MOE_CLEAN, MOE_CORRUPT, metric="logit_diff")


def test_custom_metric_and_chat_messages():
    s = moe("tiny")
    ids = s.tokenizer(MOE_CLEAN)["input_ids"]
    a, b = two_answers(s, ids)
    default = s.patch(MOE_CLEAN, MOE_CORRUPT, at="mlp", answers=(a, b))
    custom = s.patch(MOE_CLEAN, MOE_CORRUPT, at="mlp", metric=lambda logits: logits[-1, a] - logits[-1, b])
    # the metric sees every position's logits; the default projects the last one alone (other matmul shapes)
    assert torch.allclose(custom.scores, default.scores, atol=ATOL) and custom.answers is None
    messages, other = [{"role": "user", "content": "the cat"}], [{"role": "user", "content": "the dog"}]
    rendered = render(s.tokenizer, messages)
    assert len(rendered) == len(render(s.tokenizer, other))  # the harmony template, both 153 tokens
    r = s.patch(messages, other, at="attention_heads", answers=(a, b))
    assert r.clean_tokens == [s.tokenizer.decode([t]) for t in rendered]
    assert torch.equal(r.scores, s.patch(rendered, render(s.tokenizer, other), at="attention_heads",
                                         answers=(a, b)).scores)


def test_result_figure_and_html():
    s = moe("tiny")
    ids = s.tokenizer(MOE_CLEAN)["input_ids"]
    r = s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", answers=two_answers(s, ids))
    fig = r.figure()
    heat = fig.data[0]
    assert heat.type == "heatmap" and heat.zmid == 0 and heat.zmin == -heat.zmax
    assert list(heat.y) == [f"layer {i}" for i in r.layers] and len(heat.x) == len(ids) == len(set(heat.x))
    assert heat.x[1] == "1 ·c→·do" and heat.x[3] == "3 ·s"  # where clean and corrupt differ, the label says both
    assert "%{x}" in heat.hovertemplate and "%{z" in heat.hovertemplate
    assert torch.allclose(torch.tensor(heat.z, dtype=torch.float32), r.normalized, equal_nan=True)
    assert "Activation patching" in r._repr_html_() and "normalised" in repr(r)
    assert patching_heatmap(r, value="metric").data[0].z.tolist() == r.scores.tolist()
    # The title is the figure's, with how to read it underneath (it was lost once: passed where the trace goes),
    # and no fixed width pushes columns off a notebook's screen: the figure takes the page's width.
    assert fig.layout.title.text.startswith("Activation patching · residual stream")
    assert "1 = patching that site alone" in fig.layout.title.subtitle.text
    assert fig.layout.width is None


# ---- bad requests ------------------------------------------------------------------------------------------
def test_prompts_of_different_lengths_are_refused_with_how_to_align_them():
    s = moe("tiny")
    with pytest.raises(PatchingError) as e:
        s.patch("the cat sat on the mat", "a dog sat", at="residual")
    msg = str(e.value)
    assert "same number of tokens" in msg and "filler words" in msg and "every site kind" in msg
    assert "clean tokens:" in msg and "corrupt tokens:" in msg
    with pytest.raises(PatchingError, match="same number of tokens"):  # heads patch every position: also refused
        s.patch("the cat sat on the mat", "a dog sat", at="attention_heads")


def test_over_the_budget_is_refused_naming_cheaper_requests():
    s = moe("tiny")
    cost = s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", dry_run=True)
    with pytest.raises(PatchingBudgetError) as e:
        s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", budget=cost.total_bytes - 1)
    msg = str(e.value)
    assert isinstance(e.value, CaptureBudgetError)
    assert "batch_size=" in msg and "at='experts'" in msg and "budget=" in msg
    small = s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", batch_size=1, dry_run=True)
    with pytest.raises(PatchingBudgetError, match=r"layers=\[0"):
        s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", batch_size=1, budget=small.total_bytes - small.cached_bytes // 2)


@pytest.mark.slow
def test_experts_on_a_dense_model_is_refused(smollm2_session):
    with pytest.raises(PatchingError, match="Mixture-of-Experts.*at='mlp'"):
        smollm2_session.patch(IOI_CLEAN, IOI_CORRUPT, at="experts")


def test_unknown_site_kind_is_refused():
    s = moe("tiny")
    with pytest.raises(PatchingError, match="not a site kind.*'residual', 'attention_heads', 'mlp', 'experts'"):
        s.patch(MOE_CLEAN, MOE_CORRUPT, at="heads")


def test_other_bad_requests():
    s = moe("tiny")
    with pytest.raises(PatchingError, match="both predict"):  # a random model: the same greedy token
        s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual")
    with pytest.raises(PatchingError, match="out of range"):
        s.patch(MOE_CLEAN, MOE_CORRUPT, at="residual", layers=[9])
    with pytest.raises(PatchingError, match="batch_size"):
        s.patch(MOE_CLEAN, MOE_CORRUPT, batch_size=0)
    with pytest.raises(PatchingError, match="answers"):
        s.patch(MOE_CLEAN, MOE_CORRUPT, answers=(1,))


def test_an_error_mid_run_leaves_the_model_as_it_was():
    """An exception inside a patched forward (raised from a hook of the test's own on lm_head) unwinds every hook
    and router transform: the model gives bit-identical logits and holds only the test's hook."""
    s = moe("tiny")
    ids = s.tokenizer(MOE_CLEAN)["input_ids"]
    before, snapshot = full_logits(s.model, ids), state(s.model)
    calls = []

    def fail_on_the_fourth_forward(module, args, output):
        calls.append(1)
        if len(calls) == 4:  # clean, corrupt, the first patched batch, then here: the second patched batch
            raise RuntimeError("boom")
    for at in SITES:
        calls.clear()
        handle = s.model.lm_head.register_forward_hook(fail_on_the_fourth_forward)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                s.patch(MOE_CLEAN, MOE_CORRUPT, at=at, answers=(0, 1), batch_size=2)
        finally:
            handle.remove()
        assert len(calls) == 4
        assert torch.equal(full_logits(s.model, ids), before) and state(s.model) == snapshot, at
    assert not s.busy


@pytest.mark.slow
def test_readme_example_runs_as_written(smollm2_dir):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "s.patch(" in b)
    namespace: dict = {}
    exec(compile(block, "README activation patching", "exec"), namespace)
    r, e = namespace["r"], namespace["e"]
    assert r.answer_strings == (" Mary", " John") and r.scores.shape == (30, 14) and r.clean > 0 > r.corrupt
    assert r.normalized[-1, -1] == pytest.approx(1.0, abs=1e-4)  # the last layer's last position carries it all
    assert e.scores.shape == (2, 8) and namespace["fig"].data[0].type == "heatmap"
