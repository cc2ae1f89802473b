"""Behaviour on a batch of questions: greedy answers, many at once, and how many are right.

    answers = behaviour.ask(s, ["What is 23 + 19?", ...], reasoning_effort="medium")
    answers.accuracy(["42", ...])
    with s.ablate_experts({1: [3]}):                 # the same questions with an expert switched off
        off = behaviour.ask(s, questions)
    calls = behaviour.call_tools(s, ["How many letters are in the word pear?"], tools=[word_length_tool])
    calls.accuracy([("word_length", {"word": "pear"})])

Interventions are contexts on the session, so whatever is active when `ask` runs acts on every answer. The batch
runs through the model's own `generate` (left-padded, cached decode, greedy); each answer is cut at its first stop
token and parsed like `s.chat`'s (harmony channels for gpt-oss). Greedy answers from a padded batch equal `s.chat`'s
one by one up to floating-point ties (tests/test_behaviour.py checks it on gpt-oss-nano).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from workbench.chat import harmony as chat_format
from workbench.errors import WorkbenchError


@dataclass
class Answers:
    """Greedy answers to `questions`: the final channel (the whole text for a model without harmony), the
    analysis channel, whether the answer has the expected form, and the completion's token ids."""

    questions: list[str]
    finals: list[str]
    analyses: list[str]
    form_ok: list[bool]
    token_ids: list[list[int]] = field(repr=False)

    def right(self, expected) -> list[bool]:
        """Per question: the final answer equals the expected one (compared as stripped strings)."""
        expected = [str(e).strip() for e in expected]
        if len(expected) != len(self.finals):
            raise WorkbenchError(f"{len(expected)} expected answers for {len(self.finals)} questions: give one each")
        return [f == e for f, e in zip(self.finals, expected)]

    def accuracy(self, expected) -> float:
        r = self.right(expected)
        return sum(r) / len(r) if r else float("nan")

    def __len__(self) -> int:
        return len(self.finals)


def _parsed(tokenizer, ids: list[int], stops: set[int]) -> tuple[str, str, bool]:
    parser = chat_format.parse(tokenizer, ids)
    if not chat_format.is_harmony(tokenizer):
        text = parser.channels.get("final", "").strip()
        return text, "", bool(text)
    messages = [(m["channel"], m.get("recipient")) for m in parser.messages]
    ok = messages == [("analysis", None), ("final", None)] and bool(ids) and ids[-1] in stops
    return parser.channels.get("final", "").strip(), parser.channels.get("analysis", "").strip(), ok


@torch.no_grad()
def complete(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch: int = 32) -> list[list[int]]:
    """Greedy completions of token-id prompts, `batch` at a time (left-padded), each cut after its first stop token."""
    stops = chat_format.stop_token_ids(tokenizer, model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = model.get_input_embeddings().weight.device
    completions: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            completions.append(row[:cut + 1] if cut is not None else row)
    return completions


def ask(session, questions, *, reasoning_effort: str | None = "medium", max_new_tokens: int = 96,
        batch: int = 32) -> Answers:
    """Greedy answers to each question (a user turn), `batch` at a time, under whatever interventions are active."""
    if isinstance(questions, str):
        raise WorkbenchError("ask takes a list of questions; for one question use s.chat(question)")
    questions = list(questions)
    if not all(isinstance(q, str) for q in questions):
        raise WorkbenchError("every question must be a str (the user's turn)")
    if max_new_tokens < 1 or batch < 1:
        raise WorkbenchError(f"max_new_tokens and batch must be at least 1 (got {max_new_tokens}, {batch})")
    model, tokenizer = session.model, session.tokenizer
    effort = reasoning_effort if session.harmony else None
    prompts = [session.render(q, reasoning_effort=effort) for q in questions]
    with session.exclusive("asking questions"):
        completions = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch=batch)
    stops = set(chat_format.stop_token_ids(tokenizer, model.generation_config))
    parsed = [_parsed(tokenizer, ids, stops) for ids in completions]
    return Answers(questions=questions, finals=[p[0] for p in parsed], analyses=[p[1] for p in parsed],
                   form_ok=[p[2] for p in parsed], token_ids=completions)


@dataclass
class ToolCalls:
    """Greedy tool calls (harmony): the function each answer calls (`to=functions.NAME`), its JSON arguments (None
    when they do not parse), and whether the form is right (an analysis message, then one commentary call ending in
    <|call|>)."""

    questions: list[str]
    functions: list[str | None]
    arguments: list[dict | None]
    form_ok: list[bool]
    token_ids: list[list[int]] = field(repr=False)

    def right(self, expected) -> list[bool]:
        """Per question: the right form, function and arguments (expected: (function name, arguments dict) pairs)."""
        expected = list(expected)
        if len(expected) != len(self.functions):
            raise WorkbenchError(f"{len(expected)} expected calls for {len(self.functions)} questions: give one each")
        return [ok and f == name and a == args
                for ok, f, a, (name, args) in zip(self.form_ok, self.functions, self.arguments, expected)]

    def accuracy(self, expected) -> float:
        r = self.right(expected)
        return sum(r) / len(r) if r else float("nan")


def call_tools(session, questions, tools, *, reasoning_effort: str | None = "medium", max_new_tokens: int = 96,
               batch: int = 32) -> ToolCalls:
    """Greedy answers to questions asked with tool definitions (one list for all, or one list per question), parsed
    as tool calls. Harmony models only: other chat templates write calls in their own formats."""
    if not session.harmony:
        raise WorkbenchError("call_tools reads harmony tool calls (gpt-oss); this model does not use harmony.")
    questions = list(questions)
    if not questions or not all(isinstance(q, str) for q in questions):
        raise WorkbenchError("call_tools takes a non-empty list of questions (strings: the user's turns)")
    per_question = tools and all(isinstance(t, (list, tuple)) for t in tools)
    tools = [list(t) for t in tools] if per_question else [list(tools)] * len(questions)
    if len(tools) != len(questions):
        raise WorkbenchError(f"{len(tools)} tool lists for {len(questions)} questions: give one list, or one each")
    model, tokenizer = session.model, session.tokenizer
    prompts = [session.render(q, reasoning_effort=reasoning_effort, tools=t) for q, t in zip(questions, tools)]
    with session.exclusive("asking questions"):
        completions = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch=batch)
    call = tokenizer.convert_tokens_to_ids("<|call|>")
    functions, arguments, form = [], [], []
    for ids in completions:
        p = chat_format.parse(tokenizer, ids)
        messages = [(m["channel"], m.get("recipient")) for m in p.messages]
        ok = (len(messages) == 2 and messages[0] == ("analysis", None) and messages[1][0] == "commentary"
              and bool(messages[1][1]) and bool(ids) and ids[-1] == call)
        recipient = messages[-1][1] if messages else None
        functions.append(recipient.removeprefix("functions.") if recipient else None)
        try:
            arguments.append(json.loads(p.messages[-1]["content"]) if ok else None)
        except ValueError:
            arguments.append(None)
        form.append(ok)
    return ToolCalls(questions=questions, functions=functions, arguments=arguments, form_ok=form,
                     token_ids=completions)
