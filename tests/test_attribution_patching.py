"""Attribution patching: gradient x (clean - corrupt) agrees with true activation patching, and refuses presets without
gradients. The agreement is measured (a correlation over every site) on two real models: SmolLM2 and gpt-oss-nano."""
from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench import fixtures
from workbench.errors import PatchingError

CASES = {
    # model, clean, corrupt, kinds, the lowest correlation accepted (measured values in the comments)
    "smollm2": ("The capital of France is the city of", "The capital of Germany is the city of"),
    "nano": ("What is 23 + 45?", "What is 23 + 46?"),  # as the chat prompt up to the ones digit (ones_prompt)
}


def load(name):
    path = fixtures.smollm2_path() if name == "smollm2" else fixtures.nano_path()
    return wb.load(str(path), preset="bf16" if name == "nano" else "auto")


def prompts(s, name):
    clean, corrupt = CASES[name]
    if name != "nano":
        return clean, corrupt
    # nano answers in a chat: the prompt and the start of its column-by-column analysis, up to the ones digit of b
    return tuple(s.render(q, reasoning_effort="medium") + s.tokenizer.encode(
        f"<|channel|>analysis<|message|>Ones: 3 + ", add_special_tokens=False) for q in (clean, corrupt))


def correlation(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize("name", ["smollm2", "nano"])
def test_attribution_patching_agrees_with_patching(name):
    s = load(name)
    clean, corrupt = prompts(s, name)
    before = s.trace(clean, what=["blocks.0.resid_post"])["blocks.0.resid_post"]
    for at in ("residual", "attention_heads"):
        estimate = s.attribution_patching(clean, corrupt, at=at)
        true = s.patch(clean, corrupt, at=at, answers=estimate.answers)
        assert estimate.method == "attribution" and estimate.scores.shape == true.scores.shape
        assert abs(estimate.clean - true.clean) < 1e-3 and abs(estimate.corrupt - true.corrupt) < 1e-3
        r = correlation(estimate.scores - estimate.corrupt, true.scores - true.corrupt)
        assert r > MIN_CORRELATION[(name, at)], (name, at, r)
    # nothing left behind: no gradient kept, the model computes as before
    assert all(p.grad is None for p in s.model.parameters())
    assert torch.equal(s.trace(clean, what=["blocks.0.resid_post"])["blocks.0.resid_post"], before)


# Measured (2026-12-05, this machine): SmolLM2 residual 0.983, attention heads 0.982; nano residual 0.998, attention
# heads 0.999 (and experts 0.577: top-k routing is not linear in the router logits, so it is not asserted). The
# thresholds sit below what was measured, so a real loss of agreement fails and float noise does not.
MIN_CORRELATION = {("smollm2", "residual"): 0.9, ("smollm2", "attention_heads"): 0.9,
                   ("nano", "residual"): 0.95, ("nano", "attention_heads"): 0.95}


def test_hook_point_names_and_refusals():
    s = load("nano")
    clean, corrupt = prompts(s, "nano")
    by_kind = s.attribution_patching(clean, corrupt, at="residual", layers=[2])
    by_name = s.attribution_patching(clean, corrupt, at="blocks.2.resid_post")
    assert torch.equal(by_kind.scores, by_name.scores)
    a, b = by_kind.answers  # a metric of the user's gets every position's logits [tokens, vocab]
    custom = s.attribution_patching(clean, corrupt, at="residual", layers=[2],
                                    metric=lambda logits: logits[-1, a] - logits[-1, b])
    assert torch.equal(custom.scores, by_kind.scores) and custom.answers is None
    experts = s.attribution_patching(clean, corrupt, at="experts")
    assert experts.scores.shape == (4, 8)
    with pytest.raises(PatchingError, match="not a site kind.*hook points of one of these kinds"):
        s.attribution_patching(clean, corrupt, at="blocks.*.attn.q")
    packed = wb.load(str(fixtures.nano_path("mxfp4")), preset="mxfp4")
    with pytest.raises(PatchingError, match="needs gradients through the weights.*preset 'mxfp4'"):
        packed.attribution_patching(clean, corrupt)
