"""Residual steering (exact, harmony-channel aware), the module-hook escape hatch, and trace provenance."""
import pytest
import torch

import workbench as wb
from workbench import views
from workbench.intervene.steering import writing_channels


@pytest.fixture(scope="module")
def oss(tiny_checkpoint):
    return wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")  # float32: exact arithmetic


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    return wb.load(str(tiny_checkpoint("mixtral")), preset="cpu")


TEXT = "the cat sat on the mat and the dog sat on the log"


def _vector(s, seed=0):
    return torch.randn(s.model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _logits(s, ids):
    with torch.no_grad():
        return s.model(input_ids=torch.tensor([ids])).logits[0]


def test_steering_adds_exactly_scale_times_vector_to_that_layers_residual(oss):
    v, layer, scale = _vector(oss), 2, 3.0
    before = oss.trace(TEXT, what=["residuals"], dtype=torch.float32)
    with oss.steer(v, layer, scale=scale):
        inside = oss.trace(TEXT, what=["residuals"], dtype=torch.float32)
    assert torch.equal(inside.residual(layer), before.residual(layer) + scale * v)
    assert torch.equal(inside.residual(layer - 1), before.residual(layer - 1))  # layers before: untouched
    assert not torch.equal(inside.residual(layer + 1), before.residual(layer + 1))  # the change flows on


def test_steered_logits_equal_the_final_norm_and_unembedding_of_the_moved_residual(oss):
    """At the last layer the logits move by exactly the vector's contribution: lm_head(norm(h + a v))."""
    v, last, scale = _vector(oss, 1), oss.model.config.num_hidden_layers - 1, 2.0
    ids = oss.tokenizer(TEXT)["input_ids"]
    h = oss.trace(ids, what=["residuals"], dtype=torch.float32).residual(last)
    with oss.steer(v, -1, scale=scale):  # -1: the model's last layer
        steered = _logits(oss, ids)
    with torch.no_grad():
        by_hand = oss.model.lm_head(oss.model.model.norm(h + scale * v))
    assert torch.equal(steered, by_hand)


def test_steering_equals_a_plain_forward_hook_and_leaves_nothing_behind(oss):
    v, layer = _vector(oss, 2), 1
    ids = oss.tokenizer(TEXT)["input_ids"]
    clean = _logits(oss, ids)
    module = oss.model.model.layers[layer]
    handle = module.register_forward_hook(lambda m, a, out: (out[0] + 0.5 * v,) + out[1:]
                                          if isinstance(out, tuple) else out + 0.5 * v)
    try:
        reference = _logits(oss, ids)
    finally:
        handle.remove()
    with oss.steer(v, layer, scale=0.5):
        assert torch.equal(_logits(oss, ids), reference)
    assert torch.equal(_logits(oss, ids), clean)  # bit-identical after the block
    with pytest.raises(RuntimeError, match="boom"):
        with oss.steer(v, layer):
            raise RuntimeError("boom")
    assert torch.equal(_logits(oss, ids), clean) and not oss.active_interventions


def test_steering_vector_is_the_mean_difference_of_residuals(oss):
    pos, neg, layer = ["good good good", "great day"], ["bad bad bad", "awful day"], 1
    v = oss.steering_vector(pos, neg, layer)

    def last(p):
        return oss.trace(p, what=["residuals"], layers=[layer], dtype=torch.float32).residual(layer)[-1]
    expected = torch.stack([last(p) for p in pos]).mean(0) - torch.stack([last(p) for p in neg]).mean(0)
    assert torch.equal(v, expected) and v.shape == (oss.model.config.hidden_size,)


def test_channel_limited_steering_touches_only_that_channels_positions(oss):
    """Traced over a harmony conversation with reasoning and an answer, steering with channels=["final"]
    moves the residual at exactly the positions after which the model writes the final answer."""
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "thinking": "Two plus three is five.", "content": "It is 5."}]
    ids = wb.chat.render(oss.tokenizer, messages, add_generation_prompt=False)
    writing = writing_channels(oss.tokenizer, ids)
    assert "analysis" in writing and "final" in writing
    v, layer = _vector(oss, 3), 1
    before = oss.trace(ids, what=["residuals"], layers=[layer], dtype=torch.float32).residual(layer)
    for channels in (["final"], ["analysis"]):
        with oss.steer(v, layer, scale=1.0, channels=channels):
            inside = oss.trace(ids, what=["residuals"], layers=[layer], dtype=torch.float32).residual(layer)
        moved = (inside != before).any(-1).tolist()
        assert moved == [w in channels for w in writing]
        assert torch.equal(inside[torch.tensor(moved)], before[torch.tensor(moved)] + v)


def test_writing_channels_agree_with_the_parser_labels(oss):
    """Position i is steered when token i + 1 is content of that channel (or the token that closes it)."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "thinking": "Say hello.", "content": "Hello there."}]
    ids = wb.chat.render(oss.tokenizer, messages, add_generation_prompt=False)
    writing = writing_channels(oss.tokenizer, ids)
    tokens = oss.tokenizer.convert_ids_to_tokens(ids)
    first = next(i for i, t in enumerate(tokens) if t == "<|start|>" and
                 oss.tokenizer.decode(ids[i + 1:i + 12]).startswith("assistant"))
    start = tokens.index("<|channel|>", first)  # what the model writes after "<|start|>assistant"
    completion = wb.chat.parse(oss.tokenizer, ids[start:])
    assert {"analysis", "final"} <= set(completion.token_channels)
    labels = ["prompt"] * start + list(completion.token_channels)
    for i in range(len(ids) - 1):
        if labels[i + 1] in ("analysis", "final"):
            assert writing[i] == labels[i + 1], i


def test_steering_bad_input(oss, mixtral):
    with pytest.raises(wb.InterventionError, match=r"shape \(7,\).*64 wide"):
        oss.steer(torch.zeros(7), 0)
    with pytest.raises(wb.InterventionError, match="layer 9 is out of range"):
        oss.steer(_vector(oss), 9)
    with pytest.raises(wb.InterventionError, match="needs a harmony model"):
        mixtral.steer(_vector(mixtral), 0, channels=["final"])
    with pytest.raises(wb.InterventionError, match="choose among"):
        oss.steer(_vector(oss), 0, channels=["reasoning"])
    with pytest.raises(wb.InterventionError, match="finite"):
        oss.steer(_vector(oss), 0, scale=float("nan"))


# ---- the escape hatch ----------------------------------------------------------------------------------
def test_hook_reads_and_replaces_any_module_output_inside_the_block(oss):
    ids = oss.tokenizer(TEXT)["input_ids"]
    clean = _logits(oss, ids)
    assert "model.layers.1.mlp" in oss.modules() and oss.modules("o_proj")[0].endswith("o_proj")
    seen = []
    with oss.hook("model.layers.1.self_attn.o_proj", lambda m, a, out: seen.append(out.detach().clone())):
        assert torch.equal(_logits(oss, ids), clean)  # reading changes nothing
    assert len(seen) == 1 and seen[0].shape == (1, len(ids), oss.model.config.hidden_size)
    mlp = oss.model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: (out[0] * 0,) + tuple(out[1:]))
    try:
        reference = _logits(oss, ids)
    finally:
        handle.remove()
    with oss.hook("model.layers.1.mlp", lambda m, a, out: (out[0] * 0,) + tuple(out[1:])):
        assert torch.equal(_logits(oss, ids), reference)
    assert torch.equal(_logits(oss, ids), clean)


def test_hook_on_a_path_that_does_not_exist_lists_near_matches(oss):
    with pytest.raises(wb.InterventionError, match=r"no module 'model.layers.1.mlpp'.*model\.layers\.1\.mlp"):
        oss.hook("model.layers.1.mlpp", lambda *a: None)


# ---- provenance ----------------------------------------------------------------------------------------------
def test_traces_record_what_was_active_and_keep_it_in_their_file(oss, tmp_path):
    clean = oss.trace(TEXT)
    assert clean.provenance == []
    with oss.ablate_experts({0: [1]}), oss.steer(_vector(oss), 1, scale=2.0), \
            oss.hook("model.layers.0.mlp", lambda *a: None):
        t = oss.trace(TEXT)
        with oss.capture(what=["routing"]) as cap:
            with torch.no_grad():
                oss.model(input_ids=torch.tensor([t.tokens.ids]))
    names = [p["name"] for p in t.provenance]
    assert names == ["ablate_experts", "steer", "hook"]
    assert t.provenance[0]["spec"] == {"0": [1]} and t.provenance[1]["scale"] == 2.0
    assert [p["name"] for p in cap.trace(oss.tokenizer).provenance] == names
    loaded = wb.Trace.load(t.save(tmp_path / "steered.wbtrace"))
    assert loaded.provenance == t.provenance and "with ablate_experts" in repr(loaded)
    assert "taken with ablate_experts" in views.expert_load(t).layout.title.subtitle.text
    assert not views.expert_load(clean).layout.title.subtitle.text or \
        "taken with" not in views.expert_load(clean).layout.title.subtitle.text
    assert oss.trace(TEXT).provenance == []  # everything left with the blocks
