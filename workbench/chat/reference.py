"""openai-harmony as the reference: conversations rendered by OpenAI's own library.

    ids = render_harmony(messages, reasoning_effort="low")   # gpt-oss's o200k_harmony token ids

Conversations are the workbench's (Hugging Face) messages, read the way the gpt-oss chat template reads them:
a first system/developer message is the developer instructions; an assistant's `thinking` is an analysis
message, its `content` the final answer (or, beside `tool_calls`, a commentary preamble); each tool call is a
commentary message to `functions.NAME` with content type `<|constrain|>json`; a "tool" message is the result,
from `functions.NAME` to the assistant. With `add_generation_prompt=False` the trailing assistant turn is
rendered as the model wrote it: the prompt before it (as for a completion), then its messages, the final
answer ending in <|return|>.

openai-harmony reads its vocabulary from the workbench cache (workbench.chat.vocabulary), never the network.
"""
from __future__ import annotations

import datetime
import json

from workbench.chat import vocabulary
from workbench.chat.messages import as_messages, check_reasoning_effort, leading_instructions
from workbench.errors import ChatError

_EFFORTS = {"low": "LOW", "medium": "MEDIUM", "high": "HIGH"}


def library():
    """(openai_harmony module, its HARMONY_GPT_OSS encoding), or a ChatError that says how to install them."""
    try:
        encoding = vocabulary.harmony_encoding()
    except ImportError as err:
        raise ChatError(f"renderer='harmony' and check_template need openai-harmony and gpt-oss's vocabulary: "
                        f"{err}") from err
    import openai_harmony

    return openai_harmony, encoding


def today() -> str:
    """The date the chat template writes ("Current date: ..."): local time, as transformers' strftime_now."""
    return datetime.datetime.now().strftime("%Y-%m-%d")


def _tool_description(oh, tool):
    if callable(tool):  # apply_chat_template accepts functions too, and describes them the same way
        from transformers.utils import get_json_schema

        tool = get_json_schema(tool)
    tool = tool.get("function", tool)
    return oh.ToolDescription.new(tool["name"], tool.get("description") or "", parameters=tool.get("parameters"))


def conversation(messages, *, reasoning_effort=None, system=None, developer=None, tools=None, date=None):
    """openai-harmony messages for a conversation: (header [system, developer], one list per input message)."""
    oh = library()[0]
    A = oh.Role.ASSISTANT
    instructions, messages = leading_instructions(as_messages(messages), developer)
    content = oh.SystemContent.new().with_conversation_start_date(date or today())
    content = content.with_reasoning_effort(oh.ReasoningEffort[_EFFORTS[reasoning_effort or "medium"]])
    if system is not None:
        content = content.with_model_identity(system)
    header = [oh.Message.from_role_and_content(oh.Role.SYSTEM, content)]
    if instructions or tools:
        dev = oh.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools([_tool_description(oh, t) for t in tools])
        header.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))

    turns, last_call = [], None
    for m in messages:
        group = []
        if m["role"] == "user":
            group.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
        elif m["role"] == "assistant":
            if m.get("thinking"):
                group.append(oh.Message.from_role_and_content(A, m["thinking"]).with_channel("analysis"))
            if m.get("tool_calls"):
                if m.get("content"):
                    group.append(oh.Message.from_role_and_content(A, m["content"]).with_channel("commentary"))
                for call in m["tool_calls"]:
                    call = call.get("function", call)
                    args = call["arguments"]
                    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    group.append(oh.Message.from_role_and_content(A, args).with_channel("commentary")
                                 .with_recipient(f"functions.{call['name']}").with_content_type("<|constrain|>json"))
                    last_call = call["name"]
            else:
                group.append(oh.Message.from_role_and_content(A, m["content"]).with_channel("final"))
        elif m["role"] == "tool":
            name = m.get("name") or last_call
            if not name:
                raise ChatError("A tool result needs the tool's name: give the message a 'name', or put the "
                                "assistant message with its tool_calls before it.")
            author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
            group.append(oh.Message.from_author_and_content(author, m["content"]).with_channel("commentary")
                         .with_recipient("assistant"))
        turns.append((m["role"], group))
    return header, turns


def render_harmony(messages, *, reasoning_effort=None, system=None, developer=None, tools=None,
                   add_generation_prompt=True, date=None) -> list[int]:
    """o200k_harmony token ids of a conversation, rendered by openai-harmony (see the module docstring)."""
    oh, encoding = library()
    check_reasoning_effort(reasoning_effort, harmony=True)
    header, turns = conversation(messages, reasoning_effort=reasoning_effort, system=system, developer=developer,
                                 tools=tools, date=date)
    if add_generation_prompt:
        flat = header + [m for _, group in turns for m in group]
        return encoding.render_conversation_for_completion(oh.Conversation.from_messages(flat), oh.Role.ASSISTANT)
    n = len(turns)
    while n and turns[n - 1][0] == "assistant":  # the trailing assistant turn: what the model wrote
        n -= 1
    context = header + [m for _, group in turns[:n] for m in group]
    written = [m for _, group in turns[n:] for m in group]
    ids = encoding.render_conversation(oh.Conversation.from_messages(context))
    for m in written:
        ids += encoding.render(m)
    if written and written[-1].channel == "final":  # the end of generation, as in render_conversation_for_training
        ids[-1] = encoding.encode("<|return|>", allowed_special="all")[0]
    return ids
