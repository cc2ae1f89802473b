"""The input rule: a string is raw text in every analysis tool, wb.user(...) a chat turn rendered exactly as s.chat
renders it, a Generation is traced as it was generated; ambiguous shapes are refused with what to write."""
import pytest
import torch

import workbench as wb
from workbench.chat import inputs as input_rule


@pytest.fixture(scope="module")
def s(tiny_checkpoint):
    return wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")


def raw(s, text):
    return list(s.tokenizer(text)["input_ids"])


def test_a_chat_turn_said_explicitly_is_what_chat_feeds_the_model(s):
    g = s.chat("Why is the sky blue?", reasoning_effort="low", temperature=0, max_new_tokens=2)
    turn = wb.user("Why is the sky blue?", reasoning_effort="low")
    assert s.trace(turn, what=["routing"]).tokens.ids == list(g.prompt_ids)
    assert s.render(turn) == list(g.prompt_ids) == s.render("Why is the sky blue?", reasoning_effort="low")
    assert s.chat(turn, temperature=0, max_new_tokens=2).token_ids == g.token_ids
    # a message list is a conversation too, rendered the same way
    assert s.trace([{"role": "user", "content": "Why is the sky blue?"}]).tokens.ids == s.render("Why is the sky blue?")
    # the rendering options travel with the turn: another effort, other ids
    assert s.render(wb.user("Why is the sky blue?", reasoning_effort="high")) != list(g.prompt_ids)
    with pytest.raises(wb.ChatError, match="say it once"):
        s.render(turn, reasoning_effort="high")


def test_a_string_is_raw_text_in_every_analysis_tool(s):
    text = "the cat sat on the mat"
    ids = raw(s, text)
    assert s.trace(text, what=["routing"]).tokens.ids == ids
    r = s.compare(text, {"nothing": []}, max_new_tokens=2)
    assert r.prompt_ids == ids
    a = s.attribute(text)
    assert a.position == len(ids) - 1 and a.position_token == s.tokenizer.decode([ids[-1]])
    p = s.patch(text, "the dog sat on the mat", at="residual", layers=[0], dry_run=True)
    assert p.tokens == len(ids)
    stats = s.routing_stats([text], progress=False, token_table=False)
    assert stats.tokens == len(ids)
    # the steering vector of a string is measured on the string's own tokens, the same as tracing it
    v = s.steering_vector(text, "the dog sat on the mat", layer=0)
    point = "blocks.0.resid_post"
    expect = (s.trace(text, what=[point], dtype=torch.float32)[point][-1]
              - s.trace("the dog sat on the mat", what=[point], dtype=torch.float32)[point][-1])
    assert torch.equal(v, expect)


def test_chat_turns_reach_every_analysis_tool(s):
    turn, other = wb.user("Why is the sky blue?"), wb.user("Why is the sea blue?")
    chat_ids = s.render("Why is the sky blue?")
    assert s.compare(turn, {"nothing": []}, max_new_tokens=2).prompt_ids == chat_ids
    v = s.steering_vector(turn, other, layer=-1)
    point = "blocks.-1.resid_post"
    expect = (s.trace(chat_ids, what=[point], dtype=torch.float32)[point][-1]
              - s.trace(s.render("Why is the sea blue?"), what=[point], dtype=torch.float32)[point][-1])
    assert torch.equal(v, expect)
    # several turns are a batch where a tool takes one
    stats = s.routing_stats([turn, other], progress=False, token_table=False)
    assert stats.tokens == len(chat_ids) + len(s.render("Why is the sea blue?"))


def test_a_generation_is_traced_as_generated_and_compared_from_its_prompt(s):
    g = s.chat(wb.user("hello"), temperature=0, max_new_tokens=3)
    assert s.trace(g, what=["routing"]).tokens.ids == list(g.prompt_ids) + list(g.token_ids)
    assert s.compare(g, {"nothing": []}, max_new_tokens=3).texts["baseline"] == g.text


@pytest.mark.parametrize("bad, words", [
    ({"role": "user", "content": "hi"}, "one message dict: wrap it in a list"),
    (["the cat", 3], "mixes int, str in one list"),
    ("", "empty string"),
    ([], "empty list"),
    (torch.zeros(2, 3, dtype=torch.long), r"shape \(2, 3\): give one sequence"),
    (torch.zeros(3), "float32 tensor: token ids are integers"),
    (3.5, "must be text .*wb.user"),
])
def test_ambiguous_or_empty_inputs_are_refused_with_what_to_write(s, bad, words):
    with pytest.raises(wb.CaptureError, match=words):
        s.trace(bad)


def test_single_input_tools_refuse_a_batch_and_name_the_input(s):
    with pytest.raises(wb.PatchingError, match=r"clean is a list of 2 strs, a batch: this takes one input"):
        s.patch(["the cat", "the dog"], "the cow", dry_run=True)
    with pytest.raises(wb.AttributionError, match="attribute's input is one message dict"):
        s.attribute({"role": "user", "content": "hi"})
    with pytest.raises(wb.PatchingError, match="outside the model's vocabulary"):
        s.patch([1, 2, 10**9], [1, 2, 3], dry_run=True)
    with pytest.raises(wb.RoutingStatsError, match="a corpus item is one message dict"):
        s.routing_stats([{"role": "user", "content": "hi"}], progress=False)
    with pytest.raises(wb.RoutingStatsError, match="no 'text' field.*text_key="):
        s.routing_stats([{"body": "hi"}], progress=False)
    with pytest.raises(wb.InterventionError, match="needs at least one negative input"):
        s.steering_vector("the cat", [], layer=0)


def test_rendering_keywords_are_refused_where_a_string_is_raw_text(s):
    with pytest.raises(wb.InterventionError, match=r"a string is raw text here: write s.compare\(wb.user\('hi'"):
        s.compare("hi", {"nothing": []}, reasoning_effort="low", max_new_tokens=1)
    r = s.compare(wb.user("hi", reasoning_effort="low"), {"nothing": []}, max_new_tokens=1)
    assert r.prompt_ids == s.render("hi", reasoning_effort="low")
    r = s.compare([{"role": "user", "content": "hi"}], {"nothing": []}, reasoning_effort="low", max_new_tokens=1)
    assert r.prompt_ids == s.render("hi", reasoning_effort="low")
    r = s.compare(wb.user("hi"), {"nothing": []}, reasoning_effort="low", max_new_tokens=1)
    assert r.prompt_ids == s.render("hi", reasoning_effort="low")
    with pytest.raises(wb.ChatError, match="say it once"):
        s.compare(wb.user("hi", reasoning_effort="high"), {"nothing": []}, reasoning_effort="low", max_new_tokens=1)


def test_batch_shapes():
    assert input_rule.is_batch(["a", "b"]) and input_rule.is_batch([wb.user("a"), wb.user("b")])
    assert not input_rule.is_batch([1, 2, 3]) and not input_rule.is_batch([{"role": "user", "content": "a"}])
    assert not input_rule.is_batch("abc") and not input_rule.is_batch(wb.user("a"))
    with pytest.raises(wb.ChatError, match="takes the user's text as a string"):
        wb.user(["hi"])
    assert "user: 'hi'" in repr(wb.user("hi"))
