"""Chat: render conversations with the tokenizer's chat template, and parse generated ids into channels.

gpt-oss speaks *harmony*: ``<|start|>{role}<|channel|>{channel}<|message|>{content}<|end|>``; a completion
ends with ``<|return|>`` (final answer) or ``<|call|>`` (tool call). Generation starts after the prompt's
``<|start|>assistant``, so a completion's first header begins with ``<|channel|>`` directly.
Other models get a plain parser that labels everything "final".
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from workbench.errors import ChatError


HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
REASONING_EFFORTS = ("low", "medium", "high")


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

    Decodes a small window (a few already-emitted tokens for context + the new ones) so cost stays
    bounded; holds everything back while the text ends in U+FFFD (an incomplete UTF-8 character).
    """

    def __init__(self, decode):
        self.decode, self.ids = decode, []
        self.prefix, self.read = 0, 0  # window start; end of already-emitted tokens

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._step(force=False)

    def flush(self) -> str:
        return self._step(force=True)

    def _step(self, force: bool) -> str:
        if self.read == len(self.ids):
            return ""
        done_text = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if not force and (text.endswith("\ufffd") or len(text) <= len(done_text)):
            return ""
        self.prefix, self.read = max(self.read - 4, 0), len(self.ids)  # keep a little context
        return text[len(done_text):]


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

def as_messages(prompt) -> list[dict]:
    """A string becomes one user message; a list of {"role", "content"} dicts is checked and copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping) or not isinstance(prompt, (list, tuple)):
        raise ChatError(f"Expected a prompt string or a list of messages like [{{'role': 'user', "
                        f"'content': '...'}}], got {type(prompt).__name__}.")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ChatError(f"Message {i} must be a dict with a string 'role' (and 'content'), got {m!r:.80}.")
        has_calls = bool(m.get("tool_calls"))
        if not isinstance(m.get("content"), str) and not (has_calls and m.get("content") is None):
            raise ChatError(f"Message {i} ({m['role']}) needs a string 'content', got {m.get('content')!r:.80}.")
        out.append(dict(m))
    if not out:
        raise ChatError("The message list is empty: give at least one message.")
    return out


def render(tokenizer, messages, *, reasoning_effort=None, system=None, developer=None,
           add_generation_prompt=True) -> list[int]:
    """Token ids of a conversation, through the tokenizer's own chat template.

    Harmony: `system` sets the template's model identity line, `developer` becomes the developer message,
    `reasoning_effort` is low/medium/high. Plain models: `system` and `developer` merge into one system message.
    """
    messages = as_messages(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatError("This tokenizer has no chat template: render the prompt yourself and pass its "
                        "token ids instead of messages.")
    kwargs: dict[str, Any] = {}
    if is_harmony(tokenizer):
        if reasoning_effort is not None:
            if reasoning_effort not in REASONING_EFFORTS:
                raise ChatError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                                f"got {reasoning_effort!r}.")
            kwargs["reasoning_effort"] = reasoning_effort
        if system is not None:
            kwargs["model_identity"] = system
        if developer is not None:
            # The harmony template reads instructions only from the first system/developer message.
            if messages[0]["role"] in ("system", "developer"):
                developer = developer + "\n\n" + messages.pop(0)["content"]
            messages.insert(0, {"role": "developer", "content": developer})
    else:
        if reasoning_effort is not None:
            raise ChatError(f"reasoning_effort={reasoning_effort!r} needs a harmony model (gpt-oss); "
                            f"this model does not use harmony. Leave reasoning_effort unset.")
        text = "\n\n".join(s for s in (system, developer) if s)
        if text:
            messages.insert(0, {"role": "system", "content": text})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **kwargs)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]
