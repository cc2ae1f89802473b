"""Conversations as the workbench takes them: Hugging Face style messages, checked before anything renders them.

    as_messages("Hi")  ->  [{"role": "user", "content": "Hi"}]

Roles: system, developer, user, assistant (`content` the answer, `thinking` its reasoning, `tool_calls`) and
tool (a result). Harmony reads the leading system/developer messages as one block of developer instructions.
"""
from __future__ import annotations

from collections.abc import Mapping

from workbench.errors import ChatError

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")


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
        if m["role"] not in ROLES:
            raise ChatError(f"Message {i} has role {m['role']!r}; the roles are {', '.join(ROLES)}.")
        has_calls = bool(m.get("tool_calls"))
        if not isinstance(m.get("content"), str) and not (has_calls and m.get("content") is None):
            raise ChatError(f"Message {i} ({m['role']}) needs a string 'content', got {m.get('content')!r:.80}.")
        out.append(dict(m))
    if not out:
        raise ChatError("The message list is empty: give at least one message.")
    return out


def leading_instructions(messages: list[dict], developer: str | None) -> tuple[str | None, list[dict]]:
    """(developer instructions, the rest) for harmony: `developer` then every leading system/developer message.

    Harmony has a single developer message before the conversation; one placed later has nowhere to go.
    """
    n = 0
    while n < len(messages) and messages[n]["role"] in ("system", "developer"):
        n += 1
    for i, m in enumerate(messages[n:], n):
        if m["role"] in ("system", "developer"):
            raise ChatError(f"Message {i} ({m['role']}) comes after the conversation started: harmony has one "
                            f"developer message, before it. Move it to the start, or pass developer=....")
    parts = ([developer] if developer is not None else []) + [m["content"] for m in messages[:n]]
    return ("\n\n".join(parts) if parts else None), messages[n:]


def check_reasoning_effort(reasoning_effort, harmony: bool) -> None:
    """Nothing, or a ChatError: a reasoning effort needs harmony, and is one of REASONING_EFFORTS."""
    if reasoning_effort is None:
        return
    efforts = ", ".join(REASONING_EFFORTS)
    if not harmony:
        raise ChatError(f"reasoning_effort={reasoning_effort!r} needs a harmony model (gpt-oss), where it is one of "
                        f"{efforts}; this model does not use harmony. Leave reasoning_effort unset.")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatError(f"reasoning_effort must be one of {efforts}, got {reasoning_effort!r}.")
