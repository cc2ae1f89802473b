"""Chat: render conversations with the tokenizer's chat template, and parse generated ids into channels.

gpt-oss speaks *harmony*: ``<|start|>{role}<|channel|>{channel}<|message|>{content}<|end|>``; a completion
ends with ``<|return|>`` (final answer) or ``<|call|>`` (tool call). Generation starts after the prompt's
``<|start|>assistant``, so a completion's first header begins with ``<|channel|>`` directly.
Other models get a plain parser that labels everything "final". `render(..., renderer="harmony")` renders with
openai-harmony itself (workbench.chat.reference) instead of the template.

Why one module of about 430 lines: rendering and parsing of one format, kept together so that they stay each other's
inverse (tests/test_chat.py renders and parses back).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Protocol

from workbench.chat.messages import (REASONING_EFFORTS, ROLES, as_messages, check_reasoning_effort,  # noqa: F401
                                     leading_instructions)
from workbench.errors import ChatError

HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")


@dataclasses.dataclass
class Delta:
    """One streamed piece of text."""
    text: str
    channel: str          # "analysis" | "commentary" | "final" | any other harmony channel name
    token_ids: list[int]  # the completion token ids this piece covers
    index: int            # position (in the completion) of the first of those tokens


class StreamParser(Protocol):
    channels: dict[str, str]
    token_channels: list[str]
    messages: list[dict]
    done: bool

    def feed(self, token_id: int) -> list[Delta]: ...
    def finish(self) -> list[Delta]: ...


# --- tokenizer helpers -------------------------------------------------------------------------

def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if it is a single token of this vocabulary, else None."""
    try:
        i = tokenizer.convert_tokens_to_ids(token)
    except Exception:
        return None
    if not isinstance(i, int) or i < 0 or i == getattr(tokenizer, "unk_token_id", None):
        return None
    return i if tokenizer.convert_ids_to_tokens(i) == token else None


def is_harmony(tokenizer) -> bool:
    """True when the vocabulary has harmony's control tokens as single tokens (gpt-oss)."""
    return all(_token_id(tokenizer, t) is not None for t in ("<|start|>", "<|channel|>", "<|message|>",
                                                               "<|end|>", "<|return|>"))


def _as_id_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end a completion: harmony <|return|>/<|call|> (+ eos); plain models their eos ids."""
    ids: list[int] = []
    if is_harmony(tokenizer):
        ids += [_token_id(tokenizer, "<|return|>"), _token_id(tokenizer, "<|call|>")]
    ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    if generation_config is not None:
        ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
    return list(dict.fromkeys(i for i in ids if i is not None))  # dedupe, keep order


# --- incremental detokenization -----------------------------------------------------------------

class _Detok:
    """Decode a growing id list piece by piece, emitting only text that will not change.

    Decodes a window (a few already-emitted tokens for context + the new ones) so cost stays bounded.
    Text ending in U+FFFD is an incomplete UTF-8 character: what comes before it is emitted, its bytes
    are held back until the character is whole (as openai-harmony's StreamableParser does).
    """

    def __init__(self, decode):
        self.decode, self.ids = decode, []
        self.prefix, self.emitted = 0, 0  # window start; characters of decode(window) already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._step(force=False)

    def flush(self) -> str:
        return self._step(force=True)

    def _step(self, force: bool) -> str:
        text = self.decode(self.ids[self.prefix:])
        stable = text if force else text.rstrip("\ufffd")
        if len(stable) <= self.emitted:
            return ""
        out, self.emitted = stable[self.emitted:], len(stable)
        if stable == text:  # nothing held back: slide the window, keeping a little context
            self.prefix = max(len(self.ids) - 4, 0)
            self.emitted = len(self.decode(self.ids[self.prefix:]))
        return out


# --- harmony -----------------------------------------------------------------------------------

def _decoder(tokenizer):
    # Exact text: keep special tokens and the spaces that "clean up" would remove.
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class _HFCodec:
    """The adapter HarmonyStreamParser needs, built from a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.decode = _decoder(tokenizer)
        self.special_ids = {t: _token_id(tokenizer, t) for t in HARMONY_TOKENS}
        self.stop_ids = stop_token_ids(tokenizer)


class _Channels:
    """State shared by both parsers: the text per channel, one label per token, finished messages."""

    def __init__(self):
        self.channels: dict[str, str] = {}
        self.token_channels: list[str] = []
        self.messages: list[dict] = []
        self.done = False
        self.message: dict | None = None  # the message whose content is streaming now
        self.pending: list[int] = []      # content ids fed since the last delta
        self.pending_index = 0

    def _start_content(self, decode, **header):
        self.message = {"role": "assistant", "channel": None, "recipient": None, "content": "",
                        "content_type": None, **header}
        self.detok, self.pending = _Detok(decode), []

    @property
    def _label(self) -> str:
        return self.message["channel"] or "final"

    def _content_token(self, token_id: int, index: int) -> list[Delta]:
        if not self.pending:
            self.pending_index = index
        self.pending.append(token_id)
        return self._delta(self.detok.push(token_id))

    def _delta(self, text: str) -> list[Delta]:
        if not text:
            return []
        ids, self.pending = self.pending, []
        self.message["content"] += text
        self.channels[self._label] = self.channels.get(self._label, "") + text
        return [Delta(text, self._label, ids, self.pending_index)]

    def _close_message(self) -> list[Delta]:
        """Flush the held-back text of the current message and record the message."""
        if self.message is None:
            return []
        out = self._delta(self.detok.flush())
        self.messages.append(self.message)
        self.message = None
        return out


class HarmonyStreamParser(_Channels):
    """Split harmony completion ids into channels, incrementally.

    `codec` is a Hugging Face tokenizer, or any object with `decode(ids) -> str` and `special_ids`
    ({"<|start|>": id, ...} for HARMONY_TOKENS), optionally `stop_ids` (more ids that end the completion).
    """

    def __init__(self, codec):
        super().__init__()
        self.codec = _HFCodec(codec) if hasattr(codec, "convert_tokens_to_ids") else codec
        self.control = {i: t for t, i in self.codec.special_ids.items() if i is not None}
        self.stop_ids = set(getattr(self.codec, "stop_ids", ())) - set(self.control)
        # The prompt ended with "<|start|>assistant": we begin inside that header, where the only
        # text the model may write before <|channel|> is a recipient (" to=functions.x").
        self._new_header(implicit=True)

    def _new_header(self, implicit=False):
        self.header = {"role": [], "channel": None, "constrain": None}  # ids of each header part
        self.part, self.implicit = "role", implicit

    def _open_message(self):
        text = {k: "" if v is None else self.codec.decode(v) for k, v in self.header.items()}
        role_words, channel_words = text["role"].split(), text["channel"].split()
        role = "assistant" if self.implicit or not role_words else role_words.pop(0)
        channel = channel_words.pop(0) if channel_words else None
        recipient = content_type = None
        for w in role_words + channel_words:  # " to=functions.x" may sit in either part
            if w.startswith("to="):
                recipient = w[3:]
            else:
                content_type = w  # "<|channel|>commentary json" (the chat template's spelling)
        if self.header["constrain"] is not None:
            content_type = text["constrain"].strip()
        self.header = None
        self._start_content(self.codec.decode, role=role, channel=channel, recipient=recipient,
                            content_type=content_type)

    def _header_is_text(self) -> bool:
        """In the implicit header, anything but the start of " to=..." means the model skipped the header."""
        s = self.codec.decode(self.header["role"]).lstrip()
        return not ("to=".startswith(s) or s.startswith("to="))

    def feed(self, token_id: int) -> list[Delta]:
        token_id, index = int(token_id), len(self.token_channels)
        tok = self.control.get(token_id) or ("<|return|>" if token_id in self.stop_ids else None)
        if tok is None:  # ordinary text
            if self.header is not None and self.part == "role" and self.implicit:
                self.header["role"].append(token_id)
                self.token_channels.append("header")
                if not self._header_is_text():
                    return []
                # No header after all: replay the held ids as "final" content.
                ids, self.header = self.header["role"], None
                del self.token_channels[-len(ids):]
                self._start_content(self.codec.decode, channel="final")
                return [d for i, t in enumerate(ids) for d in self._text(t, index - len(ids) + 1 + i)]
            if self.header is not None:
                self.header[self.part].append(token_id)
                self.token_channels.append("header")
                return []
            if self.message is None:  # text after <|end|> without a header: "final"
                self._start_content(self.codec.decode, channel="final")
            return self._text(token_id, index)

        self.token_channels.append("header")
        out: list[Delta] = []
        if tok in ("<|end|>", "<|return|>", "<|call|>"):
            out, self.header = self._close_message(), None
            self.done = self.done or tok != "<|end|>"
        elif tok == "<|start|>":
            out = self._close_message()
            self._new_header()
        elif tok in ("<|channel|>", "<|constrain|>", "<|message|>"):
            if self.header is None:  # a header without <|start|>: role "assistant" implied
                out = self._close_message()
                self._new_header(implicit=True)
            if tok == "<|message|>":
                self._open_message()
            else:
                self.part = tok[2:-2]
                self.header[self.part] = []
        return out

    def _text(self, token_id: int, index: int) -> list[Delta]:
        self.token_channels.append(self._label)
        return self._content_token(token_id, index)

    def finish(self) -> list[Delta]:
        """Flush held-back text; a message cut mid-content is recorded as it stands."""
        self.header = None
        return self._close_message()


class PlainStreamParser(_Channels):
    """For models without harmony: all text is "final"; any stop id (eos) ends the completion."""

    def __init__(self, tokenizer, stop_ids=None):
        super().__init__()
        self.stop_ids = set(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
        self._start_content(_decoder(tokenizer), channel="final")

    def feed(self, token_id: int) -> list[Delta]:
        token_id, index = int(token_id), len(self.token_channels)
        if token_id in self.stop_ids or self.done:
            self.token_channels.append("header")  # eos, and anything after it, is not answer text
            self.done = True
            return self._close_message()
        self.token_channels.append("final")
        return self._content_token(token_id, index)

    def finish(self) -> list[Delta]:
        return self._close_message()


def make_parser(tokenizer) -> StreamParser:
    """HarmonyStreamParser for harmony tokenizers (gpt-oss), else PlainStreamParser."""
    return HarmonyStreamParser(tokenizer) if is_harmony(tokenizer) else PlainStreamParser(tokenizer)


def parse(tokenizer, token_ids) -> StreamParser:
    """Parse a whole completion at once: feed every id, finish, return the parser."""
    p = make_parser(tokenizer)
    for t in _as_id_list(token_ids):
        p.feed(t)
    p.finish()
    return p


# --- rendering ---------------------------------------------------------------------------------

RENDERERS = ("template", "harmony")


def decode(tokenizer, ids) -> str:
    """The exact text of token ids, control tokens included."""
    return _decoder(tokenizer)(list(ids))


_CONTROL_TEXT = re.compile(r"<\|[^|<>\s]+\|>")


def _check_no_control_text(tokenizer, messages, developer, system) -> None:
    """Refuse text that the template path would turn into control tokens, where openai-harmony keeps text.

    The template's output is tokenized as one string, so "<|end|>" inside a message becomes the control token.
    """
    fields = [("developer", developer), ("system", system)]
    for i, m in enumerate(messages):
        fields += [(f"message {i} ({m['role']})", m.get(key)) for key in ("content", "thinking")]
    for where, text in fields:
        for token in _CONTROL_TEXT.findall(text) if isinstance(text, str) else ():
            if _token_id(tokenizer, token) is not None:
                raise ChatError(f"The {where} contains {token!r}, which the chat template would turn into a control "
                                f"token (openai-harmony encodes it as text). Remove it, or pass renderer='harmony' "
                                f"to render it as text.")


def render(tokenizer, messages, *, reasoning_effort=None, system=None, developer=None, tools=None,
           add_generation_prompt=True, renderer=None) -> list[int]:
    """Token ids of a conversation, through the tokenizer's own chat template (or openai-harmony).

    Harmony: `system` sets the model identity line, `developer` (plus any leading system/developer messages)
    becomes the developer instructions, `reasoning_effort` is low/medium/high, `tools` are JSON-schema tool
    declarations ({"type": "function", "function": {"name", "description", "parameters"}}).
    Plain models: `system` and `developer` merge into one system message.
    `renderer="harmony"` renders with openai-harmony itself (gpt-oss's vocabulary only); see chat.reference.
    Without a generation prompt, a trailing assistant turn is rendered as the model wrote it.
    """
    messages = as_messages(messages)
    if renderer not in (None, *RENDERERS):
        raise ChatError(f"renderer must be one of {', '.join(RENDERERS)} (default: template), got {renderer!r}.")
    harmony = is_harmony(tokenizer)
    check_reasoning_effort(reasoning_effort, harmony)
    options = dict(reasoning_effort=reasoning_effort, system=system, developer=developer, tools=tools,
                   add_generation_prompt=add_generation_prompt)
    if renderer == "harmony":
        return _render_with_openai_harmony(tokenizer, messages, **options)
    return _render_template(tokenizer, messages, harmony, **options)


def _render_template(tokenizer, messages, harmony, *, reasoning_effort, system, developer, tools,
                     add_generation_prompt, complete=True) -> list[int]:
    """The template path of render(); `complete=False` skips the check that nothing was left out."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatError("This tokenizer has no chat template: render the prompt yourself and pass its "
                        "token ids instead of messages.")
    given = messages  # as the caller wrote them: error messages count from these
    kwargs: dict[str, Any] = {}
    if harmony:
        instructions, messages = leading_instructions(messages, developer)
        _check_no_control_text(tokenizer, given, developer, system)
        if instructions is not None:
            messages = [{"role": "developer", "content": instructions}] + messages
        if reasoning_effort is not None:
            kwargs["reasoning_effort"] = reasoning_effort
        if system is not None:
            kwargs["model_identity"] = system
    else:
        text = "\n\n".join(s for s in (system, developer) if s)
        if text:
            messages = [{"role": "system", "content": text}] + messages
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, **kwargs)
    except Exception as err:  # a template is code from the checkpoint: whatever it raises, say where it came from
        raise ChatError(f"The chat template could not render this conversation: {err}") from err
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = ids[0]
    ids = [int(i) for i in ids]
    if complete:
        _check_rendered(tokenizer, ids, given, tools)
    return ids


def _check_rendered(tokenizer, ids, messages, tools) -> None:
    """Templates skip what they do not know (tool results, tool declarations) without a word: say so."""
    results = [(i, m) for i, m in enumerate(messages) if m["role"] == "tool"]
    if not results and not tools:
        return
    text = decode(tokenizer, ids)
    for i, m in results:
        if m["content"].strip() not in text:
            raise ChatError(f"This model's chat template does not render tool results: message {i} (tool) is "
                            f"missing from the prompt. Put the result in a user message, or render the prompt "
                            f"yourself and pass token ids.")
    for tool in tools or ():
        name = tool.get("function", tool).get("name") if isinstance(tool, Mapping) else getattr(tool, "__name__", None)
        if name and name not in text:
            raise ChatError(f"This model's chat template does not declare tools: {name!r} is missing from the "
                            f"prompt. Describe the tool in a system message instead.")


_PROBE_TEXT = "Hello, world! 日本語 🙂  code:\n\tx = 3.14"


def same_vocabulary(tokenizer) -> bool:
    """True when the tokenizer's ids are o200k_harmony's (gpt-oss's): openai-harmony's ids mean the same to it."""
    from workbench.chat import reference

    encoding = reference.library()[1]
    specials = all(_token_id(tokenizer, t) == encoding.encode(t, allowed_special="all")[0] for t in HARMONY_TOKENS)
    return specials and tokenizer.encode(_PROBE_TEXT, add_special_tokens=False) == encoding.encode(_PROBE_TEXT)


def _render_with_openai_harmony(tokenizer, messages, **kwargs) -> list[int]:
    from workbench.chat import reference

    if not (is_harmony(tokenizer) and same_vocabulary(tokenizer)):
        raise ChatError("renderer='harmony' gives gpt-oss's o200k_harmony token ids, and this tokenizer's "
                        "vocabulary is different: the ids would mean other tokens to this model. Leave renderer "
                        "unset to use the model's own chat template.")
    return reference.render_harmony(messages, **kwargs)
