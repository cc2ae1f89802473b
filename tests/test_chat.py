"""workbench.chat.harmony: harmony rendering and the streaming channel parser, on small tokenizers built here."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from workbench.chat import harmony as chat
from workbench.chat.harmony import ChatError, Delta

HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                    "<|call|>", "<|endoftext|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = ["the user asks about the weather in paris. answer: it is sunny and warm today. "
          "analysis final commentary assistant functions to=functions.get_weather json"] * 3

HARMONY_TEMPLATE = (
    "<|start|>system<|message|>{{ model_identity or 'You are a test model.' }}\n"
    "Reasoning: {{ reasoning_effort or 'medium' }}<|end|>"
    "{%- for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_bpe(specials):
    """A tiny byte-level BPE: common words merge, anything unseen (é, 🙂, 日本) splits into bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def htok():
    return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(HARMONY_SPECIALS), eos_token="<|return|>",
                                   chat_template=HARMONY_TEMPLATE)


@pytest.fixture(scope="module")
def ptok():
    return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(CHATML_SPECIALS), eos_token="<|im_end|>",
                                   chat_template=CHATML_TEMPLATE)


ANALYSIS_FINAL = ("<|channel|>analysis<|message|>The user asks about the weather in Paris. héllo 🙂<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Answer: it is sunny, 日本 ☀️.<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
             "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
             "<|message|>{\"city\": \"Paris\"}<|call|>")


def _stream(tokenizer, ids):
    """Feed ids one by one; return the parser and every delta it produced."""
    p = chat.make_parser(tokenizer)
    deltas = [d for t in ids for d in p.feed(t)] + p.finish()
    return p, deltas


def _joined(deltas):
    out = {}
    for d in deltas:
        out[d.channel] = out.get(d.channel, "") + d.text
    return out


# --- parsing -----------------------------------------------------------------------------------

def test_is_harmony_and_stop_ids(htok, ptok):
    assert chat.is_harmony(htok) and not chat.is_harmony(ptok)
    ids = chat.stop_token_ids(htok)
    assert htok.convert_tokens_to_ids("<|return|>") in ids and htok.convert_tokens_to_ids("<|call|>") in ids
    assert chat.stop_token_ids(ptok) == [ptok.convert_tokens_to_ids("<|im_end|>")]

    class GenConfig:
        eos_token_id = [ptok.convert_tokens_to_ids("<|endoftext|>"), ptok.convert_tokens_to_ids("<|im_end|>")]
    assert sorted(chat.stop_token_ids(ptok, GenConfig())) == sorted(GenConfig.eos_token_id)


def test_one_shot_analysis_and_final(htok):
    ids = htok.encode(ANALYSIS_FINAL)
    p = chat.parse(htok, ids)
    assert p.channels == {"analysis": "The user asks about the weather in Paris. héllo 🙂",
                          "final": "Answer: it is sunny, 日本 ☀️."}
    assert [(m["role"], m["channel"], m["recipient"]) for m in p.messages] == [
        ("assistant", "analysis", None), ("assistant", "final", None)]
    assert p.messages[1]["content"] == "Answer: it is sunny, 日本 ☀️."
    assert p.done
    assert len(p.token_channels) == len(ids)
    # Labels: control and header tokens are "header", content tokens carry their channel.
    text_of = {"analysis": "", "final": "", "header": ""}
    for t, label in zip(ids, p.token_channels):
        text_of[label] += htok.decode([t])
    assert text_of["header"].startswith("<|channel|>analysis<|message|>")
    assert htok.decode([t for t, lab in zip(ids, p.token_channels) if lab == "final"]) == p.channels["final"]


def test_commentary_with_recipient_ends_with_call(htok):
    p = chat.parse(htok, htok.encode(TOOL_CALL))
    call = p.messages[-1]
    assert call["channel"] == "commentary" and call["recipient"] == "functions.get_weather"
    assert call["content_type"] == "json" and call["content"] == '{"city": "Paris"}'
    assert p.done and p.channels["commentary"] == '{"city": "Paris"}'


def test_recipient_in_role_part(htok):
    # The chat template's spelling: recipient before <|channel|>, content type without <|constrain|>.
    p = chat.parse(htok, htok.encode(" to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>"))
    assert p.messages == [{"role": "assistant", "channel": "commentary", "recipient": "functions.get_weather",
                           "content": "{}", "content_type": "json"}]


@pytest.mark.parametrize("text", [ANALYSIS_FINAL, TOOL_CALL])
def test_every_cut_point_streams_like_one_shot(htok, text):
    ids = htok.encode(text)
    for cut in range(len(ids) + 1):
        one_shot = chat.parse(htok, ids[:cut])
        p, deltas = _stream(htok, ids[:cut])
        assert _joined(deltas) == one_shot.channels == p.channels, cut
        assert len(p.token_channels) == cut
        # Deltas cover each content token exactly once, in order, at the right positions.
        covered = [i for d in deltas for i in range(d.index, d.index + len(d.token_ids))]
        assert covered == sorted(set(covered))
        assert [ids[i] for i in covered] == [t for d in deltas for t in d.token_ids]
        # Each channel text is a prefix of the full completion's (finish() of a cut mid-character
        # flushes a trailing replacement character, the only text not in the full one).
        full = chat.parse(htok, ids).channels
        assert all(full[c].startswith(s.rstrip("\ufffd")) for c, s in one_shot.channels.items()), cut


def test_multibyte_characters_are_held_back(htok):
    n = len(htok.encode("<|channel|>final<|message|>"))
    ids = htok.encode("<|channel|>final<|message|>🙂")
    assert len(ids) == n + 4  # the emoji is four byte tokens
    p = chat.make_parser(htok)
    got = [p.feed(t) for t in ids]
    assert got[:-1] == [[]] * (len(ids) - 1)  # nothing while the character is incomplete
    assert got[-1] == [Delta("🙂", "final", ids[n:], n)]
    # Cut mid-character: finish() flushes what is there (a replacement character).
    p = chat.parse(htok, ids[:n + 2])
    assert p.channels["final"] == "\ufffd" and p.messages[0]["content"] == "\ufffd"


def test_text_without_header_is_final(htok):
    p = chat.parse(htok, htok.encode("It is sunny.<|return|>"))
    assert p.channels == {"final": "It is sunny."}
    assert p.messages[0]["channel"] == "final" and p.done
    assert set(p.token_channels[:-1]) == {"final"} and p.token_channels[-1] == "header"
    # Text that starts like a recipient (" to=...") is held as header until it clearly is not one.
    p, deltas = _stream(htok, htok.encode("tomorrow it is sunny"))
    assert p.channels == {"final": "tomorrow it is sunny"} == _joined(deltas)
    assert deltas[0].index == 0 and p.token_channels == ["final"] * len(p.token_channels)
    # After <|end|>, text with no new header is "final" too.
    p = chat.parse(htok, htok.encode("<|channel|>analysis<|message|>hmm<|end|>Sunny."))
    assert p.channels == {"analysis": "hmm", "final": "Sunny."}


def test_cut_inside_header_and_after_end(htok):
    ids = htok.encode(ANALYSIS_FINAL)
    end = ids.index(htok.convert_tokens_to_ids("<|end|>"))
    p = chat.parse(htok, ids[:end + 3])  # <|end|><|start|>assist...
    assert list(p.channels) == ["analysis"] and len(p.messages) == 1 and not p.done
    p = chat.parse(htok, ids[:2])  # <|channel|>a...
    assert p.channels == {} and p.messages == [] and p.token_channels == ["header", "header"]


def test_done_only_after_return_or_call(htok):
    ids = htok.encode(ANALYSIS_FINAL)
    p = chat.make_parser(htok)
    for t in ids[:-1]:
        p.feed(t)
        assert not p.done
    p.feed(ids[-1])
    assert p.done


def test_adapter_object_instead_of_tokenizer(htok):
    class Codec:  # what an openai_harmony encoding (or anything else) would provide
        special_ids = {t: htok.convert_tokens_to_ids(t) for t in chat.HARMONY_TOKENS}

        def decode(self, ids):
            return htok.decode(ids)
    p = chat.HarmonyStreamParser(Codec())
    for t in htok.encode(ANALYSIS_FINAL):
        p.feed(t)
    p.finish()
    assert p.channels == chat.parse(htok, htok.encode(ANALYSIS_FINAL)).channels


def test_plain_tokenizer_is_all_final_and_done_at_eos(ptok):
    text = "The capital of France is Paris. 日本🙂"
    ids = ptok.encode(text) + [ptok.eos_token_id]
    for cut in range(len(ids) + 1):
        p, deltas = _stream(ptok, ids[:cut])
        assert set(p.token_channels) <= {"final", "header"} and len(p.token_channels) == cut
        assert _joined(deltas) == p.channels == chat.parse(ptok, ids[:cut]).channels
        assert p.done == (cut == len(ids))
    assert p.channels == {"final": text} and p.token_channels[-1] == "header"
    assert p.messages == [{"role": "assistant", "channel": "final", "recipient": None, "content": text,
                           "content_type": None}]


# --- rendering ---------------------------------------------------------------------------------

def test_render_harmony(htok):
    ids = chat.render(htok, "Hi", reasoning_effort="low", system="You are terse.", developer="Be kind.")
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    text = htok.decode(ids)
    assert text == ("<|start|>system<|message|>You are terse.\nReasoning: low<|end|>"
                    "<|start|>developer<|message|>Be kind.<|end|>"
                    "<|start|>user<|message|>Hi<|end|><|start|>assistant")
    # The developer message merges with a leading system message (the template reads only the first).
    ids = chat.render(htok, [{"role": "system", "content": "A"}, {"role": "user", "content": "B"}],
                      developer="D", add_generation_prompt=False)
    assert htok.decode(ids).endswith("<|start|>developer<|message|>D\n\nA<|end|><|start|>user<|message|>B<|end|>")


def test_render_plain(ptok):
    ids = chat.render(ptok, [{"role": "user", "content": "Hi"}], system="S", developer="D")
    assert ptok.decode(ids) == ("<|im_start|>system\nS\n\nD<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\n")


def test_render_errors(htok, ptok):
    with pytest.raises(ChatError, match="low, medium, high"):
        chat.render(htok, "Hi", reasoning_effort="max")
    with pytest.raises(ChatError, match="does not use harmony"):
        chat.render(ptok, "Hi", reasoning_effort="low")
    bare = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(CHATML_SPECIALS))
    with pytest.raises(ChatError, match="token ids"):
        chat.render(bare, "Hi")
    for bad in [[{"content": "no role"}], [{"role": "user"}], ["just a string"], {"role": "user"}, [], 3]:
        with pytest.raises(ChatError):
            chat.render(ptok, bad)
    assert isinstance(ChatError("x"), ValueError)


def test_unknown_role_names_the_roles(htok, ptok):
    for tokenizer in (htok, ptok):
        with pytest.raises(ChatError, match="Message 1 has role 'robot'; the roles are system, developer, user, "
                                            "assistant, tool"):
            chat.render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}])


def test_reasoning_effort_errors_list_the_efforts(htok, ptok):
    with pytest.raises(ChatError, match=r"needs a harmony model \(gpt-oss\), where it is one of low, medium, high"):
        chat.render(ptok, "Hi", reasoning_effort="ultra")
    with pytest.raises(ChatError, match="must be one of low, medium, high, got 'ultra'"):
        chat.render(htok, "Hi", reasoning_effort="ultra")


def test_a_template_that_cannot_render_a_tool_result(ptok):
    result = [{"role": "user", "content": "Weather?"},
              {"role": "assistant", "content": "Let me look.", "tool_calls": [{"name": "w", "arguments": {}}]},
              {"role": "tool", "content": "sunny"}]
    skips = ptok.chat_template.replace("{% for m in messages %}", "{% for m in messages if m.role != 'tool' %}")
    ptok.chat_template, template = skips, ptok.chat_template
    try:
        with pytest.raises(ChatError, match="does not render tool results: message 2 .*user message"):
            chat.render(ptok, result)
        ptok.chat_template = "{{ raise_exception('this model has no tool role') }}"
        with pytest.raises(ChatError, match="The chat template could not render this conversation: this model has "
                                            "no tool role"):
            chat.render(ptok, result)
    finally:
        ptok.chat_template = template
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather."}}]
    with pytest.raises(ChatError, match="does not declare tools: 'get_weather'"):
        chat.render(ptok, "Hi", tools=tools)  # this ChatML template ignores tools


def test_harmony_developer_messages_come_first(htok):
    with pytest.raises(ChatError, match=r"Message 1 \(system\) comes after the conversation started"):
        chat.render(htok, [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late."}])
    ids = chat.render(htok, [{"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
                             {"role": "user", "content": "C"}], developer="D")
    assert "<|start|>developer<|message|>D\n\nA\n\nB<|end|>" in htok.decode(ids)


def test_as_messages():
    assert chat.as_messages("Hi") == [{"role": "user", "content": "Hi"}]
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {}}]}]
    assert chat.as_messages(msgs) == msgs
    with pytest.raises(ChatError, match="Message 1"):
        chat.as_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}])


# --- agreement with the official harmony library and the real gpt-oss template ------------------

@pytest.fixture(scope="module")
def o200k_pair():
    """gpt-oss's tokenizer and openai-harmony's encoding, both from the offline vocabulary (never skipped)."""
    from workbench.fixtures import o200k

    return o200k.o200k_harmony_tokenizer(), o200k.harmony_encoding()


def _harmony_completions(oh, enc):
    """Completions as openai-harmony renders them (after the prompt's "<|start|>assistant"), and one spelling
    the model may write itself (recipient after the channel)."""
    A = oh.Role.ASSISTANT
    thinking = oh.Message.from_role_and_content(A, "The user wants weather. héllo 🙂 𝔘𝔫𝔦 🧑‍🔬 日本").with_channel("analysis")
    call = (oh.Message.from_role_and_content(A, '{"city": "Zürich 🏔", "days": 2}').with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    final = oh.Message.from_role_and_content(A, "It is sunny ☀️ in Zürich, 21 °C.").with_channel("final")
    start = enc.encode("<|start|>assistant", allowed_special="all")

    def completion(*messages, end):
        ids = [t for m in messages for t in enc.render(m)]
        assert ids[:len(start)] == start
        return ids[len(start):-1] + enc.encode(end, allowed_special="all")

    return {
        "tool call": completion(thinking, call, end="<|call|>"),
        "answer": completion(thinking, final, end="<|return|>"),
        "recipient after the channel": enc.encode(
            "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Z\u00fcrich\"}"
            "<|call|>", allowed_special="all"),
    }


def _state(parser):
    """Finished messages and the text of the one streaming now, in openai-harmony's terms."""
    done = [(m["role"], m["channel"], m["recipient"], m["content_type"], m["content"]) for m in parser.messages]
    return done, parser.message["content"] if parser.message is not None else ""


def _official_state(oh_parser):
    done = [(m.author.role.value, m.channel, m.recipient,
             m.content_type.removeprefix("<|constrain|>") if m.content_type else None,  # ours: "json"
             "".join(c.text for c in m.content)) for m in oh_parser.messages]
    return done, oh_parser.current_content


@pytest.mark.parametrize("name", ["tool call", "answer", "recipient after the channel"])
def test_streaming_agrees_with_openai_harmony_at_every_token(o200k_pair, name):
    """Our parser on gpt-oss's tokenizer against StreamableParser(encoding, Role.ASSISTANT), token by token."""
    import openai_harmony as oh  # a test dependency ([harmony] extra): never skipped
    tok, enc = o200k_pair
    ids = _harmony_completions(oh, enc)[name]
    pieces = [enc.decode([t]) for t in ids]
    if name != "recipient after the channel":  # characters split across tokens, so the hold-back is exercised
        assert sum("\ufffd" in p for p in pieces) >= 6
    ours, official = chat.make_parser(tok), oh.StreamableParser(enc, oh.Role.ASSISTANT)
    deltas = []
    for k, t in enumerate(ids):
        deltas += ours.feed(t)
        official.process(t)
        assert _state(ours) == _official_state(official), (k, pieces[k])
    assert ours.done
    deltas += ours.finish()
    assert _joined(deltas) == ours.channels
    whole = enc.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    assert [m[4] for m in _state(ours)[0]] == ["".join(c.text for c in m.content) for m in whole]
    # Cut at every position: the stream so far is what a one-shot parse of the prefix says.
    for cut in range(len(ids) + 1):
        p, got = _stream(tok, ids[:cut])
        assert _joined(got) == chat.parse(tok, ids[:cut]).channels == p.channels, cut


def _fixture_tokenizer(harmony):
    """The shared fixture tokenizer (workbench.fixtures.tokenizer): the real gpt-oss template."""
    for name in ("workbench.fixtures.tokenizer", "workbench.fixtures.checkpoints"):
        try:
            build = getattr(__import__(name, fromlist=["x"]), "build_tokenizer", None)
        except ImportError:
            continue
        if build is not None:
            return build(harmony=harmony)
    pytest.skip("no workbench.fixtures.checkpoints(_tokenizer).build_tokenizer yet")


def test_gpt_oss_fixture_tokenizer_render_and_round_trip():
    tok = _fixture_tokenizer(harmony=True)
    assert chat.is_harmony(tok)
    ids = chat.render(tok, "Hi", reasoning_effort="high", developer="Be brief.")
    text = tok.decode(ids)
    assert "Reasoning: high" in text and "# Instructions\n\nBe brief." in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    with pytest.raises(ChatError, match="low, medium, high"):
        chat.render(tok, "Hi", reasoning_effort="extreme")
    # A completion in the fixture vocabulary.
    p = chat.parse(tok, tok.encode(ANALYSIS_FINAL))
    assert p.channels == {"analysis": "The user asks about the weather in Paris. héllo 🙂",
                          "final": "Answer: it is sunny, 日本 ☀️."} and p.done
    # The template's own rendering of a tool call parses back to the same messages.
    convo = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "thinking": "Need the weather.", "content": None,
              "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]
    ids = chat.render(tok, convo, add_generation_prompt=False)
    starts = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<|start|>")]
    p = chat.parse(tok, ids[starts[-2]:])  # the two assistant messages
    assert [(m["role"], m["channel"], m["recipient"], m["content_type"], m["content"]) for m in p.messages] == [
        ("assistant", "analysis", None, None, "Need the weather."),
        ("assistant", "commentary", "functions.get_weather", "json", '{"city": "Paris"}')]
    assert p.done


def test_chatml_fixture_tokenizer():
    tok = _fixture_tokenizer(harmony=False)
    assert not chat.is_harmony(tok)
    ids = chat.render(tok, "Hi", system="S")
    assert tok.decode(ids) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    p = chat.parse(tok, tok.encode("Paris.") + chat.stop_token_ids(tok) + tok.encode("junk"))
    assert p.channels == {"final": "Paris."} and p.done
