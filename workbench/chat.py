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

from .errors import WorkbenchError


class ChatError(WorkbenchError, ValueError):
    """Invalid chat input, or a chat feature the tokenizer/model does not support."""


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
    return all(_token_id(tokenizer, t) is not None for t in HARMONY_TOKENS[:6])


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
        ids += [_token_id(tokenizer, "<|return|>"), *_as_id_list(_token_id(tokenizer, "<|call|>"))]
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

class _HFCodec:
    """The adapter HarmonyStreamParser needs, built from a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = {t: _token_id(tokenizer, t) for t in HARMONY_TOKENS}
        self.stop_ids = stop_token_ids(tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class HarmonyStreamParser:
    """Split harmony completion ids into channels, incrementally.

    `codec` is a Hugging Face tokenizer, or any object with `decode(ids) -> str`, `special_ids`
    ({"<|start|>": id, ...} for HARMONY_TOKENS) and optionally `stop_ids` (extra ids ending the completion).
    """

    def __init__(self, codec):
        if hasattr(codec, "convert_tokens_to_ids"):
            codec = _HFCodec(codec)
        self.codec = codec
        self.by_id = {i: t for t, i in codec.special_ids.items() if i is not None}
        self.stop_ids = set(getattr(codec, "stop_ids", ())) - set(self.by_id)
        self.channels: dict[str, str] = {}
        self.token_channels: list[str] = []
        self.messages: list[dict] = []
        self.done = False
        # The completion starts inside an assistant header that the prompt opened with <|start|>assistant.
        self._new_header(role_ids=[])

    # header segments: the plain-text ids after <|start|> (role), <|channel|>, <|constrain|>
    def _new_header(self, role_ids=None):
        self.state = "header"
        self.segments = {"role": role_ids, "channel": None, "constrain": None}
        self.segment = "role"
        self.message = None

    def _open_message(self):
        seg = {k: None if v is None else self.codec.decode(v) for k, v in self.segments.items()}
        words = (seg["role"] or "").split()
        role = words[0] if words and not words[0].startswith("to=") else "assistant"
        recipient = content_type = None
        for w in words + (seg["channel"] or "").split()[1:]:  # " to=functions.x" may sit in either part
            if w.startswith("to="):
                recipient = w[3:]
            elif w != role:
                content_type = w
        channel = (seg["channel"] or "").split()[:1]
        if seg["constrain"] is not None:
            content_type = seg["constrain"].strip()
        self.message = {"role": role, "channel": channel[0] if channel else None, "recipient": recipient,
                        "content": "", "content_type": content_type}
        self.detok = _Detok(self.codec.decode)
        self.pending: list[int] = []  # ids fed since the last emitted delta
        self.state = "content"

    @property
    def _label(self) -> str:
        return self.message["channel"] or "final"

    def _emit(self, text: str) -> list[Delta]:
        if not self.pending:
            return []
        ids, self.pending = self.pending, []
        if not text:  # tokens that decode to nothing: keep them for the next piece
            self.pending = ids
            return []
        self.message["content"] += text
        self.channels[self._label] = self.channels.get(self._label, "") + text
        return [Delta(text, self._label, ids, len(self.token_channels) - self._fed_since(ids))]

    def _fed_since(self, ids) -> int:
        return len(ids) if self.token_channels and self.token_channels[-1] != "header" else len(ids) + 1

    def _close_message(self) -> list[Delta]:
        """Flush the current message's held-back text and record it."""
        out: list[Delta] = []
        if self.state == "content":
            out = self._emit_flush()
            self.messages.append(self.message)
        self.state, self.message = "between", None
        return out

    def _emit_flush(self) -> list[Delta]:
        text = self.detok.flush()
        ids, self.pending = self.pending, []
        if not text:
            return []
        self.message["content"] += text
        self.channels[self._label] = self.channels.get(self._label, "") + text
        return [Delta(text, self._label, ids, self._pending_index)]

    def feed(self, token_id: int) -> list[Delta]:
        token_id = int(token_id)
        tok = self.by_id.get(token_id)
        if tok is None and token_id in self.stop_ids:
            tok = "<|return|>"  # e.g. <|endoftext|>: treat as the end of the completion
        out: list[Delta] = []
        if tok is None:  # ordinary text
            if self.state == "between":  # text with no header: an assistant message on "final"
                self.segments = {"role": None, "channel": None, "constrain": None}
                self._open_message()
            if self.state == "header":
                self.segments[self.segment].append(token_id)
                self.token_channels.append("header")
                return []
            if not self.pending:
                self._pending_index = len(self.token_channels)
            self.pending.append(token_id)
            self.token_channels.append(self._label)
            text = self.detok.push(token_id)
            if text:
                ids, self.pending = self.pending, []
                self.message["content"] += text
                self.channels[self._label] = self.channels.get(self._label, "") + text
                out.append(Delta(text, self._label, ids, self._pending_index))
            return out
        # a control token
        self.token_channels.append("header")
        if tok in ("<|end|>", "<|return|>", "<|call|>"):
            out = self._close_message()
            self.done = self.done or tok != "<|end|>"
        elif tok == "<|start|>":
            out = self._close_message()
            self._new_header(role_ids=[])
        elif tok in ("<|channel|>", "<|constrain|>"):
            if self.state != "header":  # a header without <|start|>: role "assistant" implied
                out = self._close_message()
                self._new_header(role_ids=None)
            self.segment = tok[2:-2]
            self.segments[self.segment] = []
        elif tok == "<|message|>":
            if self.state != "header":  # stray <|message|>: start a new assistant message
                out = self._close_message()
                self._new_header(role_ids=None)
            self._open_message()
        return out

    def finish(self) -> list[Delta]:
        """Flush held-back text; a message cut mid-content is recorded as it stands."""
        return self._close_message()
