"""The widget's steering slider: a residual steering vector set from Python, its scale a slider, applied to
each generation and to the inspector's trace of it, and undone afterwards."""
import pytest
import torch

import workbench as wb
from workbench.ui.widget import widget


@pytest.fixture(scope="module")
def oss(tiny_checkpoint):
    return wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")


def test_steering_slider_applies_to_the_generation_and_its_trace(oss):
    v = torch.randn(oss.model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    w = widget(oss, temperature=0.0, max_new_tokens=12)
    try:
        w.generate("Hi there")
        plain = w.wait(timeout=60)
        with pytest.raises(wb.InterventionError, match="64 wide"):
            w.interventions.set_steering(torch.zeros(3), layer=1)
        w.interventions.set_steering(v, layer=1)
        assert w.interventions.build() == []  # the slider starts at 0: off
        w.interventions.steer_scale.value = 3.0
        assert "steer L1 × +3" in w.interventions.summary.value
        w.clear()
        w.generate("Hi there")
        steered = w.wait(timeout=60)
        with oss.steer(v, 1, scale=3.0):  # the same run, from Python
            by_hand = oss.chat("Hi there", temperature=0.0, max_new_tokens=12)
        assert steered.token_ids == by_hand.token_ids != plain.token_ids
        assert [name for name, _ in w.generation_interventions] == ["steer"]
        w.inspector.select_token(0)
        t = w.inspector.trace
        assert [p["name"] for p in t.provenance] == ["steer"] and t.provenance[0]["scale"] == 3.0
        assert not oss.active_interventions  # undone after the run and after the trace
    finally:
        w.close()
