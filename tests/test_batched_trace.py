"""Batched traces: one right-padded forward; each row equals the trace of its input alone, padding invisible."""
import pytest
import torch

import workbench as wb
from workbench import views

TEXTS = ["the cat sat on the mat", "a dog", "seventeen plus twenty five is forty two, said the teacher to the class",
         "hello"]


def _routing_mismatches_are_near_ties(row, alone) -> float:
    """Top-k sets may differ only where the k-th and (k+1)-th router logits (nearly) tie: returns the largest
    such margin seen (0.0 when every expert set agrees)."""
    worst = 0.0
    k = row.routing.indices.shape[-1]
    same = (row.routing.indices.sort(-1).values == alone.routing.indices.sort(-1).values).all(-1)  # [L, T]
    for layer_row, token in (~same).nonzero().tolist():
        top = alone.routing.logits[layer_row, token].sort(descending=True).values
        margin = float(top[k - 1] - top[k])
        assert margin < 1e-4, f"row routing differs at a clear choice (margin {margin})"
        worst = max(worst, margin)
    return worst


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_each_row_equals_its_input_traced_alone(tiny_checkpoint, family):
    s = wb.load(str(tiny_checkpoint(family)), preset="cpu")
    batch = s.trace(TEXTS, what=["routing", "attention", "residuals"], dtype=torch.float32)
    assert isinstance(batch, wb.BatchTrace) and len(batch) == len(TEXTS)
    for text, row in zip(TEXTS, batch):
        alone = s.trace(text, what=["routing", "attention", "residuals"], dtype=torch.float32)
        assert row.tokens.ids == alone.tokens.ids and row.tokens.strings == alone.tokens.strings  # no padding
        assert "key_mask" not in row.meta and row.meta["attention"] == alone.meta["attention"]
        for layer in row.attention_layers:
            assert torch.allclose(row.attention(layer), alone.attention(layer), atol=1e-5, rtol=0)
            assert torch.allclose(row.residual(layer), alone.residual(layer), atol=1e-5, rtol=1e-5)
        assert torch.allclose(row.sink_mass, alone.sink_mass, atol=1e-5, rtol=0)
        assert torch.allclose(row.routing.logits, alone.routing.logits, atol=1e-5, rtol=0)
        _routing_mismatches_are_near_ties(row, alone)


def test_views_and_files_of_a_row_show_no_padding(tiny_checkpoint, tmp_path):
    s = wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")
    batch = s.trace(TEXTS)
    short = batch[3]  # "hello", padded to the longest row in the forward
    fig = views.attention_heatmap(short, 0, 0)
    assert len(fig.data[0].y) == len(short.tokens) == len(s.tokenizer("hello")["input_ids"])
    assert views.expert_heatmap(short, 0).data[0].z.shape[0] == len(short.tokens)
    loaded = wb.Trace.load(short.save(tmp_path / "row.wbtrace"))
    assert torch.equal(loaded.routing.indices, short.routing.indices)


def test_batches_of_conversations_and_of_generations(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")
    conversations = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what is two plus two"}]]
    batch = s.trace(conversations, what=["routing"])
    assert [r.tokens.ids for r in batch] == [s.trace(c, what=["routing"]).tokens.ids for c in conversations]
    gens = [s.chat("hi", max_new_tokens=3, temperature=0, stop_tokens=[]),
            s.chat("a longer question here", max_new_tokens=5, temperature=0, stop_tokens=[])]
    batch = s.trace(gens, what=["routing"])
    for g, row in zip(gens, batch):
        assert row.tokens.ids == g.prompt_ids + g.token_ids and row.tokens.channels[-1] == g.token_channels[-1]


def test_a_batch_over_the_budget_is_refused_before_running(tiny_checkpoint):
    s = wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")
    one = s.trace(TEXTS[2], what=["attention"])
    assert one is not None
    with pytest.raises(wb.CaptureBudgetError, match="the same request on the first"):
        s.trace(TEXTS * 4, what=["attention"], budget=2_000_000)  # the forward itself needs ~3.3 MB of it
