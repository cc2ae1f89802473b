"""gpt-oss's real tokenizer offline (workbench.fixtures.o200k), harmony rendering equal to openai-harmony's token
for token, and the tiny gpt-oss on that tokenizer (chat, stream, trace, widget on gpt-oss's real ids).

Every reference here is openai-harmony itself, with its vocabulary read from the workbench cache: conversations
are built by hand with its Message/Conversation classes, not through workbench.chat.reference.
"""
import base64
import datetime
import hashlib
import importlib.util
import json
import os
import struct

import openai_harmony as oh
import pytest
import torch

import workbench as wb
from workbench import fixtures
from workbench.chat import check_template, template_check, vocabulary
from workbench.chat import harmony as chat
from workbench.errors import ChatError
from workbench.fixtures import o200k
from workbench.fixtures.tokenizer import HARMONY_CHAT_TEMPLATE, build_tokenizer

A = oh.Role.ASSISTANT


@pytest.fixture(scope="module")
def tok():
    return o200k.o200k_harmony_tokenizer()


@pytest.fixture(scope="module")
def enc():
    return o200k.harmony_encoding()


# ---- the vocabulary --------------------------------------------------------------------------------

def test_tiktoken_file_is_openais_o200k_base():
    path = o200k.tiktoken_file()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == o200k.O200K_BASE_SHA256
    lines = data.splitlines()
    assert len(lines) == o200k.O200K_BASE_SIZE
    assert lines[0] == base64.b64encode(b"!") + b" 0"  # rank 0 is the byte "!", as in tiktoken


def test_tampered_tiktoken_file_is_refused(tmp_path):
    path = o200k.tiktoken_file(cache_dir=tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1000], lines[1001] = lines[1001], lines[1000]  # two ranks swapped: same size, different vocabulary
    path.write_bytes(b"".join(lines))
    for use in (o200k.tiktoken_file, o200k.harmony_encoding, o200k.o200k_harmony_tokenizer):
        with pytest.raises(o200k.VocabularyError, match=r"Delete .*o200k_base\.tiktoken.*quicktok-v1==0\.4\.0"):
            use(cache_dir=tmp_path)
    path.unlink()  # what the message says to do: it is rebuilt, and right
    assert hashlib.sha256(o200k.tiktoken_file(cache_dir=tmp_path).read_bytes()).hexdigest() == o200k.O200K_BASE_SHA256


def _quicktok_format(entries):
    out = struct.pack("<I", len(entries))
    for rank, token in entries:
        out += struct.pack("<H", len(token)) + token + struct.pack("<I", rank)
    return out


def test_a_vocabulary_that_is_not_openais_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "o200k.vocab"
    monkeypatch.setattr(vocabulary, "quicktok_vocab_file", lambda: source)
    source.write_bytes(_quicktok_format([(1, b"b"), (0, b"a")]))
    assert vocabulary.read_quicktok_vocab(source) == [b"a", b"b"]  # rank order
    with pytest.raises(o200k.VocabularyError, match="Reinstall quicktok with `pip install quicktok-v1==0.4.0"):
        o200k.tiktoken_file(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "o200k" / o200k.TIKTOKEN_FILE).exists()  # nothing written
    source.write_bytes(_quicktok_format([(0, b"a"), (1, b"b")])[:-3])
    with pytest.raises(o200k.VocabularyError, match="truncated"):
        vocabulary.read_quicktok_vocab(source)
    source.write_bytes(_quicktok_format([(0, b"a"), (2, b"b")]))
    with pytest.raises(o200k.VocabularyError, match="not a quicktok vocabulary"):
        vocabulary.read_quicktok_vocab(source)


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("quicktok", "openai_harmony") else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install quicktok-v1==0\.4\.0"):
        o200k.tiktoken_file(cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"pip install openai-harmony==0\.0\.8"):
        o200k.harmony_encoding()


def test_openai_harmony_loads_offline_and_leaves_the_environment(monkeypatch, enc):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    assert o200k.harmony_encoding().encode("Hello, world!") == [13225, 11, 2375, 0]
    assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ
    folder = o200k.enable_offline_harmony()  # for code that calls openai_harmony itself
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(folder) == str(o200k.tiktoken_file().parent)
    direct = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    assert direct.encode("Hello, world!") == enc.encode("Hello, world!")


# ---- the tokenizer -------------------------------------------------------------------------------------

def test_specials_ids_and_roles(tok, enc):
    assert len(tok) == o200k.VOCAB_SIZE == 201_088
    for i, name in o200k.NAMED_SPECIALS.items():
        assert tok.convert_ids_to_tokens(i) == name and tok.convert_tokens_to_ids(name) == i
    for i in range(o200k.O200K_BASE_SIZE, o200k.VOCAB_SIZE):
        name = tok.convert_ids_to_tokens(i)
        assert tok.encode(name, add_special_tokens=False) == [i]
        # openai-harmony agrees on every name but one: it calls 200018 <|reserved_200018|>.
        assert name == (enc.decode([i]) if i != 200018 else "<|endofprompt|>")
        assert enc.is_special_token(i)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (199998, 200002, 199999)
    assert tok.chat_template == HARMONY_CHAT_TEMPLATE
    assert chat.is_harmony(tok) and chat.stop_token_ids(tok) == [200002, 200012]


def test_every_ordinary_token_is_the_same_bytes(tok, enc):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    pieces = tok.convert_ids_to_tokens(list(range(o200k.O200K_BASE_SIZE)))
    ours = [bytes(to_byte[c] for c in piece) for piece in pieces]
    theirs = [enc.decode([i], errors="surrogateescape").encode("utf-8", "surrogateescape")
              for i in range(o200k.O200K_BASE_SIZE)]
    assert ours == theirs


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Français: déjà vu, naïve café. Deutsch: Größe, Straße. Español: ¿Qué tal? Türkçe: İstanbul ılık",
    "日本語のテキストです。中文：你好，世界！한국어 텍스트. Русский текст. Ελληνικά. עברית. العربية. हिन्दी. ไทย",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\nprint(fib(30))",
    'x = {"a": [1, 2.5e-3, null], "b": "c\\"d"}; y = x?.a ?? []; z = a<=b>=c!==d && e||f',
    "emoji 🙂👍🏽 ☀️ 🇫🇷 👨‍👩‍👧‍👦 🧑‍🔬 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≠ ≤",
    "   leading and trailing   \n\n\r\n  \t\t  \u00a0 nbsp \u3000 ideographic space      ",
    "I'm sure you'll see THEY'RE here; can't won't DON'T. 123456789 3.14159 1,000,000 0x1F",
    "https://example.com/path?q=1&r=two#frag user@example.org /usr/local/bin C:\\Windows\\System32",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!!!!! ...... ------",
    "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello<|return|>",
    "<|constrain|>json<|call|><|endoftext|><|startoftext|><|reserved_200100|>",
]


def _random_texts(n=150, seed=0):
    """Seeded strings drawn from several scripts, punctuation, digits, emoji and whitespace runs."""
    g = torch.Generator().manual_seed(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x1D400, 0x1D4FF)]
    spaces = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "   \n"]
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(int(torch.randint(5, 60, (1,), generator=g))):
            pick = int(torch.randint(len(ranges) + 2, (1,), generator=g))
            if pick >= len(ranges):
                chars.append(spaces[int(torch.randint(len(spaces), (1,), generator=g))])
            else:
                lo, hi = ranges[pick]
                chars.append(chr(int(torch.randint(lo, hi + 1, (1,), generator=g))))
        texts.append("".join(chars))
    return texts


@pytest.mark.parametrize("texts", [TEXTS, _random_texts()], ids=["written", "random"])
def test_encodes_and_decodes_like_openai_harmony(tok, enc, texts):
    for text in texts:
        ids = enc.encode(text, allowed_special="all")
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert chat.decode(tok, ids) == enc.decode(ids) == text


def test_tokenizer_is_built_once_and_cached(monkeypatch, tok):
    def fail(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(o200k, "build_o200k_harmony_tokenizer", fail)
    again = o200k.o200k_harmony_tokenizer()
    assert again.encode(TEXTS[2], add_special_tokens=False) == tok.encode(TEXTS[2], add_special_tokens=False)


# ---- rendering: equal to openai-harmony, token for token --------------------------------------------------

def today():
    return datetime.datetime.now().strftime("%Y-%m-%d")


def render_both(tok, expected, messages, **kwargs):
    """(ours, openai-harmony's): `expected(date)` builds the reference ids for the date the template wrote."""
    before = today()
    ours = chat.render(tok, messages, **kwargs)
    after = today()
    theirs = expected(before)
    if ours != theirs and after != before:  # the template's clock passed midnight
        theirs = expected(after)
    return ours, theirs


def system(date, effort=oh.ReasoningEffort.MEDIUM, identity=None):
    content = oh.SystemContent.new().with_conversation_start_date(date).with_reasoning_effort(effort)
    if identity is not None:
        content = content.with_model_identity(identity)
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def developer(instructions=None, tools=None):
    content = oh.DeveloperContent.new()
    if instructions is not None:
        content = content.with_instructions(instructions)
    if tools is not None:
        content = content.with_function_tools(tools)
    return oh.Message.from_role_and_content(oh.Role.DEVELOPER, content)


def user(text):
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def said(text, channel):
    return oh.Message.from_role_and_content(A, text).with_channel(channel)


def completion(enc, *messages):
    return lambda date: enc.render_conversation_for_completion(
        oh.Conversation.from_messages([system(date), *messages]), A)


WEATHER_PARAMETERS = {
    "type": "object", "required": ["city"],
    "properties": {
        "city": {"type": "string", "description": "The city's name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "How many days ahead", "default": 0},
        "detailed": {"type": "boolean", "default": False},
        "hours": {"type": "array", "items": {"type": "number"}},
        "note": {"type": ["string", "null"]},
    },
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Gets the weather for a city.",
                                            "parameters": WEATHER_PARAMETERS}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time now.\nUTC."}}


def test_user_only(tok, enc):
    ours, theirs = render_both(tok, completion(enc, user("What is 2 + 2?")), "What is 2 + 2?")
    assert ours == theirs


def test_a_system_message_is_the_developer_instructions(tok, enc):
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
    ours, theirs = render_both(tok, completion(enc, developer("Answer in one word."), user("Capital of France?")), msgs)
    assert ours == theirs
    # A leading developer message reads the same.
    msgs[0]["role"] = "developer"
    assert render_both(tok, completion(enc, developer("Answer in one word."), user("Capital of France?")), msgs)[0] == ours


def test_developer_and_system_arguments(tok, enc):
    ours, theirs = render_both(tok, completion(enc, developer("Be brief."), user("Hi")), "Hi", developer="Be brief.")
    assert ours == theirs
    expected = lambda date: enc.render_conversation_for_completion(oh.Conversation.from_messages(
        [system(date, identity="You are a terse tutor."), user("Hi")]), A)
    ours, theirs = render_both(tok, expected, "Hi", system="You are a terse tutor.")
    assert ours == theirs


def test_developer_merged_with_a_system_message(tok, enc):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    ours, theirs = render_both(tok, completion(enc, developer("Be brief.\n\nBe kind."), user("Hi")), msgs,
                               developer="Be brief.")
    assert ours == theirs


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_every_reasoning_effort(tok, enc, effort):
    level = oh.ReasoningEffort[effort.upper()]
    expected = lambda date: enc.render_conversation_for_completion(
        oh.Conversation.from_messages([system(date, level), user("Hi")]), A)
    ours, theirs = render_both(tok, expected, "Hi", reasoning_effort=effort)
    assert ours == theirs
    assert f"Reasoning: {effort}" in chat.decode(tok, ours)


def test_multi_turn_with_earlier_answers_and_thinking(tok, enc):
    msgs = [{"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "thinking": "Easy: Paris.", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "thinking": "Rome, of course.", "content": "Rome."},
            {"role": "user", "content": "Thanks! 🙂"}]
    expected = completion(enc, user("Capital of France?"), said("Easy: Paris.", "analysis"), said("Paris.", "final"),
                          user("And of Italy?"), said("Rome, of course.", "analysis"), said("Rome.", "final"),
                          user("Thanks! 🙂"))
    ours, theirs = render_both(tok, expected, msgs)
    assert ours == theirs
    # openai-harmony drops the thinking before the first final answer only; the later turn's stays.
    text = chat.decode(tok, ours)
    assert "Easy: Paris." not in text and "Rome, of course." in text


def test_tool_declaration_call_and_result_round_trip(tok, enc):
    msgs = [{"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "thinking": "Call the tool.", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}]
    tools = [oh.ToolDescription.new("get_weather", "Gets the weather for a city.", parameters=WEATHER_PARAMETERS),
             oh.ToolDescription.new("now", "The time now.\nUTC.")]
    call = (said(json.dumps({"city": "Zürich"}, ensure_ascii=False), "commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    result = (oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"),
                                                 '{"temperature": 21, "sky": "clear"}')
              .with_channel("commentary").with_recipient("assistant"))
    expected = completion(enc, developer("Use tools.", tools), user("Weather in Zürich?"),
                          said("Call the tool.", "analysis"), call, result)
    ours, theirs = render_both(tok, expected, msgs, tools=[WEATHER, CLOCK], developer="Use tools.")
    assert ours == theirs
    text = chat.decode(tok, ours)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert 'unit?: "celsius" | "fahrenheit", // default: celsius\n' in text  # TypeScript, as harmony writes it
    # The model's side: the call parses back as openai-harmony parses it.
    start = ours.index(tok.convert_tokens_to_ids("<|call|>"))
    header = max(i for i in range(start) if ours[i] == tok.convert_tokens_to_ids("<|start|>"))
    p = chat.parse(tok, ours[header + 2:start + 1])  # after "<|start|>assistant", as generation sees it
    official = enc.parse_messages_from_completion_tokens(ours[header + 2:start + 1], A)
    assert [(m["recipient"], m["content"]) for m in p.messages] == [(m.recipient, m.content[0].text) for m in official]


def test_a_tool_result_needs_its_tools_name(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]
    for renderer in (None, "harmony"):
        with pytest.raises(ChatError, match="needs the tool's name: give the message a 'name'"):
            chat.render(tok, msgs, renderer=renderer)
    named = msgs[:1] + [{"role": "tool", "name": "answer", "content": "42"}]
    assert chat.render(tok, named) == chat.render(tok, named, renderer="harmony")
    assert "<|start|>functions.answer to=assistant<|channel|>commentary" in chat.decode(tok, chat.render(tok, named))


SCHEMAS = {
    "string, required, described": {"type": "object", "required": ["q"],
                                    "properties": {"q": {"type": "string", "description": "Query"}}},
    "enum with default": {"type": "object", "properties": {"u": {"type": "string", "enum": ["a", "b"], "default": "a"}}},
    "string default": {"type": "object", "properties": {"s": {"type": "string", "default": "hi"}}},
    "integer, number, boolean with defaults": {"type": "object", "properties": {
        "i": {"type": "integer", "default": 3}, "x": {"type": "number", "default": 1.5},
        "b": {"type": "boolean", "default": True}}},
    "arrays": {"type": "object", "properties": {
        "s": {"type": "array", "items": {"type": "string"}}, "n": {"type": "array", "items": {"type": "integer"}},
        "any": {"type": "array"}, "objects": {"type": "array", "items": {"type": "object", "properties": {
            "x": {"type": "number"}}}}, "default": {"type": "array", "items": {"type": "string"}, "default": ["x", "y"]}}},
    "nullable and type lists": {"type": "object", "properties": {
        "a": {"type": "string", "nullable": True}, "b": {"type": ["integer", "null"]}, "c": {"type": ["string"]}}},
    "nested object": {"type": "object", "required": ["loc"], "properties": {"loc": {
        "type": "object", "description": "Where", "required": ["lat"],
        "properties": {"lat": {"type": "number", "description": "Latitude"}, "lon": {"type": "number"}}}}},
    "title and examples": {"type": "object", "properties": {
        "t": {"type": "string", "title": "A title", "examples": ["x", "y"], "description": "Described"}}},
    "oneOf": {"type": "object", "properties": {"v": {
        "description": "A or B", "default": "x",
        "oneOf": [{"type": "string", "description": "A or B"}, {"type": "number", "description": "B", "default": 2}]}}},
    "no type, empty object, empty properties": {"type": "object", "properties": {
        "a": {"description": "anything"}, "b": {"type": "object"}, "c": {"type": "object", "properties": {}}}},
    "non-ASCII names": {"type": "object", "properties": {"città": {"type": "string", "description": "Nome 🙂"}}},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_tool_schemas_render_like_openai_harmony(tok, enc, name):
    tool = {"type": "function", "function": {"name": "f", "description": "Does f.", "parameters": SCHEMAS[name]}}
    expected = completion(enc, developer(tools=[oh.ToolDescription.new("f", "Does f.", SCHEMAS[name])]), user("Hi"))
    ours, theirs = render_both(tok, expected, "Hi", tools=[tool])
    assert ours == theirs, chat.decode(tok, ours)


def test_a_tool_without_parameters_or_description(tok, enc):
    tools = [{"type": "function", "function": {"name": "ping", "description": ""}},
             {"name": "pong", "description": "Plain form.\nTwo lines.\n", "parameters": None}]
    expected = completion(enc, developer(tools=[oh.ToolDescription.new("ping", ""),
                                                oh.ToolDescription.new("pong", "Plain form.\nTwo lines.\n")]), user("Hi"))
    ours, theirs = render_both(tok, expected, "Hi", tools=tools)
    assert ours == theirs


def test_an_answer_as_the_model_wrote_it(tok, enc):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "Greet.", "content": "Hello!"}]
    expected = lambda date: enc.render_conversation_for_training(oh.Conversation.from_messages(
        [system(date), user("Hi"), said("Greet.", "analysis"), said("Hello!", "final")]),
        oh.RenderConversationConfig(auto_drop_analysis=False))
    ours, theirs = render_both(tok, expected, msgs, add_generation_prompt=False)
    assert ours == theirs
    assert chat.decode(tok, ours).endswith("<|channel|>final<|message|>Hello!<|return|>")


def test_renderer_harmony_gives_openai_harmonys_ids(tok, enc):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "thinking": "Paris.", "content": "Paris."}, {"role": "user", "content": "Italy?"}]
    expected = lambda date: enc.render_conversation_for_completion(oh.Conversation.from_messages(
        [system(date, oh.ReasoningEffort.LOW, "You are X."), developer("Be brief.\n\nBe kind."),
         user("Capital of France?"), said("Paris.", "analysis"), said("Paris.", "final"), user("Italy?")]), A)
    kwargs = dict(reasoning_effort="low", system="You are X.", developer="Be brief.")
    with_harmony, theirs = render_both(tok, expected, msgs, renderer="harmony", **kwargs)
    assert with_harmony == theirs == chat.render(tok, msgs, **kwargs)
    # Text that looks like a control token stays text with openai-harmony; the template path refuses it.
    tricky = "Say <|end|> please"
    ids = chat.render(tok, tricky, renderer="harmony")
    assert enc.encode(tricky, disallowed_special=()) == ids[-len(enc.encode(tricky, disallowed_special=())) - 3:-3]
    with pytest.raises(ChatError, match=r"'<\|end\|>'.*renderer='harmony'"):
        chat.render(tok, tricky)


def test_renderer_harmony_refuses_another_vocabulary():
    small = build_tokenizer(harmony=True)  # harmony specials, but not gpt-oss's ids
    with pytest.raises(ChatError, match="vocabulary is different"):
        chat.render(small, "Hi", renderer="harmony")
    with pytest.raises(ChatError, match="renderer must be one of template, harmony"):
        chat.render(small, "Hi", renderer="jinja")


def test_renderer_harmony_without_openai_harmony_says_how_to_install(tok, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openai_harmony" else find_spec(name, *a))
    with pytest.raises(ChatError, match=r"openai-harmony is not installed: `pip install openai-harmony==0\.0\.8`"):
        chat.render(tok, "Hi", renderer="harmony")
    with pytest.raises(ChatError, match="openai-harmony is not installed"):
        check_template(tok)


# ---- check_template ------------------------------------------------------------------------------------

def test_check_template_passes_ours(tok):
    check = check_template(tok)
    assert check.ok and check.compared_ids, str(check)
    assert check.probes == [name for name, _, _ in template_check.PROBES]
    assert str(check).startswith(f"All {len(template_check.PROBES)} probe conversations render exactly")
    small = check_template(build_tokenizer(harmony=True))  # another vocabulary: the text is compared
    assert small.ok and not small.compared_ids


@pytest.mark.parametrize("old, new, probe, harmony_says", [
    # The three renderings fixed before this check existed, as an older copy of gpt-oss's template has them.
    ('"# Instructions\\n\\n" + developer_message', '"# Instructions\\n\\n" + developer_message + "\\n\\n"',
     "a system message", "<|end|>"),
    ("commentary <|constrain|>json", "commentary json", "tool declaration, call and result", "<|constrain|>"),
    ('message.content + "<|end|>" }}\n    {%- elif message.role == "user"',
     'message.content|tojson + "<|end|>" }}\n    {%- elif message.role == "user"',
     "tool declaration, call and result", "{"),
    # No TypeScript for tool parameters (what the template did before).
    ('ts(tool.parameters, "")', '"any"', "tool declaration, call and result", "{\n"),
    # The real gpt-oss template drops all earlier thinking; harmony keeps what follows the first answer.
    ("loop.index0 <= ns.first_final", "true", "two earlier turns with thinking", "analysis<|message|>Rome."),
])
def test_check_template_finds_what_an_older_copy_gets_wrong(old, new, probe, harmony_says):
    tokenizer = build_tokenizer(harmony=True)
    assert HARMONY_CHAT_TEMPLATE.count(old) == 1
    tokenizer.chat_template = HARMONY_CHAT_TEMPLATE.replace(old, new)
    check = check_template(tokenizer)
    assert not check.ok
    difference = next(d for d in check.differences if d.probe == probe)
    assert difference.harmony.startswith(harmony_says, difference.position - max(difference.position - 40, 0))
    assert probe in str(check) and "render differently from openai-harmony" in str(check)


def test_check_template_needs_a_harmony_tokenizer():
    with pytest.raises(ChatError, match="does not use harmony"):
        check_template(build_tokenizer(harmony=False))


# ---- the tiny gpt-oss on gpt-oss's real tokenizer ------------------------------------------------------

SCRIPT = ("<|channel|>analysis<|message|>The user asks about Zürich 🏔. 𝔘𝔫𝔦 🧑‍🔬.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Zürich is sunny ☀️, 21 °C.<|return|>")


@pytest.fixture(scope="module")
def session():
    path = fixtures.tiny_checkpoint("gpt_oss", tokenizer="o200k")
    return wb.load(str(path), preset="cpu")


class scripted:
    """Make the random model write SCRIPT: a large logit on the script's next token at every step."""

    def __init__(self, session, text=SCRIPT):
        self.script = session.tokenizer.encode(text, add_special_tokens=False)
        self.model, self.step = session.model, 0

    def hook(self, module, args, logits):
        if logits.shape[1] > 1:  # a prefill: the completion starts over
            self.step = 0
        if self.step < len(self.script):
            logits[:, -1, self.script[self.step]] += 100.0
        self.step += 1
        return logits

    def __enter__(self):
        self.handle = self.model.lm_head.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_o200k_fixture_checkpoint(session, tok):
    config = session.model.config
    assert config.vocab_size == 201_088 and session.model.lm_head.out_features == 201_088
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (199998, 200002, 199999)
    assert session.model.generation_config.eos_token_id == [200002, 199999, 200012]
    assert session.harmony and session.tokenizer.encode(TEXTS[5], add_special_tokens=False) == \
        tok.encode(TEXTS[5], add_special_tokens=False)
    assert fixtures.tiny_checkpoint("gpt_oss", tokenizer="o200k").name == f"tiny-gpt_oss-o200k-v{fixtures.FIXTURE_VERSION}"
    with pytest.raises(ValueError, match="for gpt_oss only"):
        fixtures.tiny_config("mixtral", tokenizer="o200k")


def test_chat_stream_and_trace_on_gpt_oss_ids(session, enc):
    prompt = [{"role": "user", "content": "Weather in Zürich?"}]
    before = today()
    with scripted(session):
        g = session.chat(prompt, reasoning_effort="low", temperature=0, max_new_tokens=80)
    with scripted(session):
        run = session.stream(prompt, reasoning_effort="low", temperature=0, max_new_tokens=80)
        deltas = list(run)
        streamed = run.result()
    # The prompt is openai-harmony's, id for id.
    expected = lambda date: enc.render_conversation_for_completion(oh.Conversation.from_messages(
        [system(date, oh.ReasoningEffort.LOW), user("Weather in Zürich?")]), A)
    assert g.prompt_ids in (expected(before), expected(today()))
    # The completion is the script, and parses as openai-harmony parses it.
    assert g.token_ids == enc.encode(SCRIPT, allowed_special="all") and g.finish_reason == "stop"
    official = enc.parse_messages_from_completion_tokens(g.token_ids, A)
    assert [(m["channel"], m["content"]) for m in g.messages] == [(m.channel, m.content[0].text) for m in official]
    assert g.text == "Zürich is sunny ☀️, 21 °C."
    # Streaming gives the same tokens; its deltas add up to the channels, each token once.
    assert streamed.token_ids == g.token_ids and streamed.channels == g.channels
    joined = {}
    for d in deltas:
        joined[d.channel] = joined.get(d.channel, "") + d.text
    assert joined == g.channels
    covered = [i for d in deltas for i in range(d.index, d.index + len(d.token_ids))]
    assert covered == sorted(set(covered)) and [g.token_ids[i] for i in covered] == [t for d in deltas for t in d.token_ids]
    # The trace replays prompt + completion on the real ids.
    t = session.trace(g)
    assert t.tokens.ids == g.prompt_ids + g.token_ids
    assert t.tokens.channels[len(g.prompt_ids):] == g.token_channels
    assert t.routing.indices.shape[:2] == (session.model.config.num_hidden_layers, len(t.tokens.ids))


def test_widget_on_gpt_oss_ids(session):
    from workbench.ui.widget import widget

    w = widget(session, temperature=0.0, max_new_tokens=80)
    try:
        with scripted(session):
            assert w.generate("Weather in Zürich?")
            g = w.wait(timeout=120)
    finally:
        w.close()
    assert g.channels == {"analysis": "The user asks about Zürich 🏔. 𝔘𝔫𝔦 🧑‍🔬.", "final": "Zürich is sunny ☀️, 21 °C."}
    assert w.final_text == g.text and w.token_count == len(g.token_ids)
    assert w.history[-1] == {"role": "assistant", "content": g.text, "thinking": g.channels["analysis"]}


def test_session_chat_with_renderer_harmony(session, tiny_checkpoint):
    with scripted(session):
        g = session.chat("Hi", reasoning_effort="high", renderer="harmony", temperature=0, max_new_tokens=80)
    assert g.prompt_ids == session.render("Hi", reasoning_effort="high")  # the template agrees with harmony
    assert g.text == "Zürich is sunny ☀️, 21 °C."
    plain = wb.load(str(tiny_checkpoint("mixtral")), preset="cpu")
    with pytest.raises(ChatError, match="vocabulary is different"):
        plain.chat("Hi", renderer="harmony", max_new_tokens=1)
