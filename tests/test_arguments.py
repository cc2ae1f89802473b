"""Wrong arguments get the workbench's own errors, naming the argument and what works, and lose nothing."""
from __future__ import annotations

import warnings

import pytest
import torch

import workbench as wb
from workbench import fixtures
from workbench.errors import BusyError, CaptureError, ChatError, ContextLengthError, SamplingError

_s: dict = {}


def smollm2():
    if "s" not in _s:
        _s["s"] = wb.load(str(fixtures.smollm2_path()))
    return _s["s"]


def logits(s, text="The capital of France is"):
    with torch.no_grad():
        return s.model(input_ids=torch.tensor([s.tokenizer(text)["input_ids"]])).logits


def test_bad_arguments_get_clear_errors_and_change_nothing():
    s = smollm2()
    before = logits(s)
    cases = [
        (lambda: s.trace("hi", dtype="float13"), CaptureError, "dtype='float13': choose torch.float32"),
        (lambda: s.trace("hi", dtype=torch.int8), CaptureError, "dtype=torch.int8"),
        (lambda: s.trace([1, 2, 10**6]), CaptureError, "token id 1000000 is outside the model's vocabulary"),
        (lambda: s.chat([1, 2, 10**6], max_new_tokens=2), ChatError, "outside the model's vocabulary"),
        (lambda: s.chat("hi", temprature=0), SamplingError, "did you mean 'temperature'"),
        (lambda: s.stream("hi", max_tokens=3), SamplingError, "It takes: .*max_new_tokens"),
        (lambda: s.chat("hi", system=123), ChatError, "system must be a string"),
        (lambda: s.chat("hi", developer=["x"]), ChatError, "developer must be a string"),
        (lambda: s.trace("a " * 9000, what=["attention"], layers=[0], heads=[0]), ContextLengthError,
         "past the model's context of 8192 tokens.*allow_longer=True"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
        assert not s.busy
    assert torch.equal(logits(s), before)


def test_a_trace_past_the_context_runs_when_allowed_with_a_warning():
    s = smollm2()
    with pytest.warns(UserWarning, match="past the model's context"):
        t = s.trace("a " * 8200, what=["attention"], layers=[0], heads=[0], allow_longer=True, budget=None)
    assert len(t.tokens) > 8192


def test_the_budget_counts_the_forward_too():
    s = wb.load(str(fixtures.nano_path()), preset="bf16", attn_implementation="eager")
    text = "word " * 1500
    with pytest.raises(wb.CaptureBudgetError, match="kept \\+ ~.* while the forward runs"):
        s.trace(text, what=["routing"], budget="20MB")  # routing alone is small; the eager forward is not
    t = s.trace(text, what=["routing"], budget="2GB")
    assert len(t.tokens) > 1000


def test_busy_error_says_what_runs_and_a_stopped_chat_frees_the_session():
    s = smollm2()
    run = s.stream("Tell me a long story.", max_new_tokens=200, temperature=0)
    with pytest.raises(BusyError, match="a generation is running on this session \\(s.stream / s.chat\\): stop it \\(run.stop\\(\\)\\)"):
        s.trace("hello")
    run.stop()
    run.result()
    assert not s.busy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.trace("hello")  # free again


def test_saving_a_trace_where_it_cannot_go_says_why(tmp_path):
    t = smollm2().trace("hello", what=["routing"] if smollm2().adapter.is_moe else ["attention"], layers=[0])
    with pytest.raises(wb.TraceFileError, match="does not exist \\(create it first"):
        t.save(tmp_path / "missing" / "run.wbtrace")
    with pytest.raises(wb.TraceFileError, match="is a folder"):
        t.save(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os
        if os.geteuid() != 0:  # root writes anywhere: the check cannot be seen failing there
            with pytest.raises(wb.TraceFileError, match="not writable"):
                t.save(locked / "run.wbtrace")
    finally:
        locked.chmod(0o700)
    assert t.save(tmp_path / "run.wbtrace").is_file()
