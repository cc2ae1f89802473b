"""The input rule, in one place: what a string, a list or a Generation means to every tool.

    s.trace("The cat sat")                 # a string is raw text, tokenized as it is (every analysis tool)
    s.trace(wb.user("Why is the sky blue?", reasoning_effort="low"))
                                           # a chat turn, said explicitly: rendered exactly as s.chat renders it
    s.trace([{"role": "user", "content": "Hi"}, ...])   # a message list is a conversation too
    s.trace(g)                             # a Generation: prompt + completion, as they were generated
    s.trace([1, 2, 3])                     # token ids as they are

`s.chat` and `s.stream` take a string as the user's turn, as their names say; `trace`, `patch`, `attribute`,
`attribution_patching`, `steering_vector`, `routing_stats` and `compare` take it as raw text. A batch is a list of
inputs (strings, `wb.user(...)` turns, message lists, Generations, id lists), where a tool takes a batch.
Shapes that could mean two things (one message dict, a list mixing strings and ids, a 2-D tensor of several rows
where one sequence is wanted) are refused with what to write instead.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from workbench import arguments
from workbench.chat.messages import as_messages


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A chat conversation and the options it is rendered with (harmony's reasoning effort, system, developer
    instructions, tools): `wb.user(...)` makes one. It renders with the model's chat template and, unless it ends
    with the assistant, a generation prompt: the same ids `s.chat(...)` feeds the model for the same turn."""
    messages: tuple
    reasoning_effort: str | None = None
    system: str | None = None
    developer: str | None = None
    tools: tuple | None = None

    def options(self) -> dict:
        return {"reasoning_effort": self.reasoning_effort, "system": self.system, "developer": self.developer,
                "tools": list(self.tools) if self.tools is not None else None}

    def __repr__(self) -> str:
        last = self.messages[-1]
        text = last.get("content") or ""
        shown = f"{text[:40]!r}{'...' if len(text) > 40 else ''}"
        more = f", {len(self.messages) - 1} earlier message(s)" if len(self.messages) > 1 else ""
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items() if v is not None and k != "tools")
        return f"Conversation({last['role']}: {shown}{more}{opts})"


def user(text: str, *, reasoning_effort: str | None = None, system: str | None = None,
         developer: str | None = None, tools: list | None = None) -> Conversation:
    """The user's turn `text` as a chat conversation, for tools where a plain string is raw text:
    `s.trace(wb.user("Why?"))` sees what `s.chat("Why?")` feeds the model."""
    from workbench.errors import ChatError

    if not isinstance(text, str):
        raise ChatError(f"user() takes the user's text as a string, not {type(text).__name__} {text!r:.60}.")
    return conversation([{"role": "user", "content": text}], reasoning_effort=reasoning_effort, system=system,
                        developer=developer, tools=tools)


def conversation(messages, *, reasoning_effort: str | None = None, system: str | None = None,
                 developer: str | None = None, tools: list | None = None) -> Conversation:
    """A message list (checked) and its rendering options as one Conversation."""
    from workbench.errors import ChatError

    for name, value in (("system", system), ("developer", developer), ("reasoning_effort", reasoning_effort)):
        arguments.optional_text(value, name, ChatError)
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ChatError(f"tools must be a list of tool definitions, not {type(tools).__name__}.")
    return Conversation(tuple(as_messages(list(messages))), reasoning_effort, system, developer,
                        tuple(tools) if tools is not None else None)


def is_generation(x) -> bool:
    return hasattr(x, "prompt_ids") and hasattr(x, "token_ids") and hasattr(x, "token_channels")


def is_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, Mapping) for m in x)


def is_batch(x) -> bool:
    """A list of inputs, as opposed to one input (a string, a Conversation, a Generation, one message list, one
    list of token ids)."""
    return isinstance(x, (list, tuple)) and bool(x) and not is_ids(x) and not is_messages(x)


def items(x, *, error: type[Exception], where: str = "the input") -> tuple[bool, list]:
    """(is it a batch, its inputs) for tools that take one input or a list of them; a list mixing token ids
    with other inputs is refused (one sequence of ids, or a batch: not both)."""
    if not is_batch(x):
        return False, [x]
    if any(isinstance(i, int) and not isinstance(i, bool) for i in x):
        kinds = sorted({type(i).__name__ for i in x})
        raise error(f"{where} mixes {', '.join(kinds)} in one list: a list is either one sequence of token ids, "
                    "one conversation (message dicts), or a batch of inputs (texts, wb.user turns, id lists).")
    return True, list(x)


def describe(x) -> str:
    return f"{type(x).__name__} {x!r:.60}"


def token_ids(tokenizer, x, *, error: type[Exception], where: str = "the input",
              vocab_size: int | None = None) -> tuple[list[int], list[str] | None]:
    """(token ids, channel labels or None) of one input, by the rule above; `error` for anything else."""
    channels = None
    if is_generation(x):
        ids = list(x.prompt_ids) + list(x.token_ids)
        if x.token_channels is not None and len(x.token_channels) == len(x.token_ids):
            channels = ["prompt"] * len(x.prompt_ids) + list(x.token_channels)
    elif isinstance(x, Conversation):
        ids = _render(tokenizer, list(x.messages), x.options(), error, where)
    elif isinstance(x, str):
        if not x:
            raise error(f"{where} is an empty string: give some text.")
        ids = list(tokenizer(x)["input_ids"])
    elif isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise error(f"{where} is a {x.dtype} tensor: token ids are integers (s.tokenizer(text)['input_ids']).")
        if x.dim() > 2 or (x.dim() == 2 and x.shape[0] != 1):
            raise error(f"{where} is a tensor of shape {tuple(x.shape)}: give one sequence of token ids (shape [T] "
                        "or [1, T]); for several, a list of them where the tool takes a batch.")
        ids = x.reshape(-1).tolist()
    elif is_ids(x):
        ids = list(x)
    elif is_messages(x):
        ids = _render(tokenizer, list(x), {}, error, where)
    elif isinstance(x, Mapping):
        raise error(f"{where} is one message dict: wrap it in a list ([{{'role': 'user', 'content': ...}}]) or "
                    "write wb.user(text).")
    elif isinstance(x, (list, tuple)) and not x:
        raise error(f"{where} is an empty list: give text, wb.user(text), messages or token ids.")
    elif isinstance(x, (list, tuple)):
        kinds = sorted({type(i).__name__ for i in x})
        if len(kinds) > 1:
            raise error(f"{where} mixes {', '.join(kinds)} in one list: a list is either one sequence of token ids, "
                        "one conversation (message dicts), or a batch of inputs of one kind.")
        raise error(f"{where} is a list of {len(x)} {kinds[0]}s, a batch: this takes one input. Pass one of them, "
                    "or the whole string.")
    else:
        raise error(f"{where} must be text (raw, tokenized as it is), wb.user(text) for a chat turn, chat messages, "
                    f"a Generation or token ids, not {describe(x)}.")
    ids = arguments.token_ids(ids, vocab_size, error, where)
    if not ids:
        raise error(f"{where} has no tokens.")
    return ids, channels


def _render(tokenizer, messages: list, options: dict, error, where: str) -> list[int]:
    from workbench.chat import harmony as chat
    from workbench.errors import ChatError

    try:
        return chat.render(tokenizer, messages, add_generation_prompt=messages[-1].get("role") != "assistant",
                           **{k: v for k, v in options.items() if v is not None})
    except ChatError as e:
        if error is ChatError:
            raise
        raise error(f"{where}: {e}") from None
