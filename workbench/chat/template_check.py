"""Check a chat template against openai-harmony: where does it render gpt-oss's format differently?

    print(check_template(tokenizer))   # "All 12 probe conversations render exactly as openai-harmony ..."

Each probe conversation exercises one feature of the format (roles, instructions, model identity, reasoning
efforts, earlier turns and their thinking, a tool round trip, an answer as written). It is rendered by the
tokenizer's own template (through workbench.chat.render) and by openai-harmony; the first difference is
reported with the text around it. Useful for a checkpoint that ships an older copy of gpt-oss's template.
"""
from __future__ import annotations

import dataclasses
import functools

from workbench.chat import harmony as chat
from workbench.chat.reference import library, render_harmony, today
from workbench.errors import ChatError

_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city's name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "How many days ahead", "default": 0},
        "detailed": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "number"}},
        "note": {"type": ["string", "null"]}}}}}
_QUESTION = {"role": "user", "content": "What is the capital of France?"}
_ANSWERED = [_QUESTION, {"role": "assistant", "thinking": "A simple fact: Paris.", "content": "Paris."}]

# (name, messages, render keywords): one feature of the format each.
PROBES = [
    ("user only", [_QUESTION], {}),
    ("a system message", [{"role": "system", "content": "Answer in one word."}, _QUESTION], {}),
    ("developer=", [_QUESTION], {"developer": "Answer in one word."}),
    ("system= (model identity)", [_QUESTION], {"system": "You are a terse geography tutor."}),
    ("developer= merged with a system message", [{"role": "system", "content": "Be kind."}, _QUESTION],
     {"developer": "Answer in one word."}),
    *[(f"reasoning_effort={e!r}", [_QUESTION], {"reasoning_effort": e}) for e in chat.REASONING_EFFORTS],
    ("multi-turn with earlier thinking", _ANSWERED + [{"role": "user", "content": "And of Italy?"}], {}),
    ("two earlier turns with thinking",
     _ANSWERED + [{"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "thinking": "Rome.", "content": "Rome."},
                  {"role": "user", "content": "Thanks!"}], {}),
    ("tool declaration, call and result",
     [{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "thinking": "I should call the tool.",
       "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}], {"tools": [_WEATHER]}),
    ("an answer as the model wrote it (add_generation_prompt=False)", _ANSWERED, {"add_generation_prompt": False}),
]


_DEFAULTS = dict(reasoning_effort=None, system=None, developer=None, tools=None, add_generation_prompt=True)


@dataclasses.dataclass
class Difference:
    probe: str
    position: int    # index of the first character (of the rendered text) that differs
    template: str    # the template's text around it
    harmony: str     # openai-harmony's text around it

    def __str__(self) -> str:
        return (f"{self.probe}: differs at character {self.position}\n"
                f"    template: {self.template!r}\n    harmony:  {self.harmony!r}")


@dataclasses.dataclass
class TemplateCheck:
    probes: list[str]
    differences: list[Difference]
    compared_ids: bool   # token ids were compared too (the tokenizer has o200k_harmony's vocabulary)

    @property
    def ok(self) -> bool:
        return not self.differences

    def __str__(self) -> str:
        what = "token for token" if self.compared_ids else "character for character"
        if self.ok:
            return f"All {len(self.probes)} probe conversations render exactly as openai-harmony renders them ({what})."
        head = (f"{len(self.differences)} of {len(self.probes)} probe conversations render differently from "
                f"openai-harmony ({what}):")
        return "\n".join([head, *map(str, self.differences)])

    def _repr_pretty_(self, printer, cycle):  # IPython shows the report, not the dataclass
        printer.text(str(self))


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_template(tokenizer) -> TemplateCheck:
    """Render PROBES with the tokenizer's chat template and with openai-harmony; report where they differ.

    Text is compared for any harmony tokenizer; token ids too when the vocabulary is o200k_harmony's.
    """
    if not chat.is_harmony(tokenizer):
        raise ChatError("check_template compares a gpt-oss (harmony) chat template with openai-harmony; this "
                        "tokenizer does not use harmony.")
    encoding = library()[1]
    compare_ids = chat.same_vocabulary(tokenizer)
    differences = []
    for name, messages, kwargs in PROBES:
        # Through render(), but keeping what the template writes even where it leaves something out.
        template = functools.partial(chat._render_template, tokenizer, chat.as_messages(messages), True,
                                     **{**_DEFAULTS, **kwargs}, complete=False)
        date = today()
        try:
            ours = template()
        except ChatError as err:
            differences.append(Difference(name, 0, f"(the template failed: {err})", ""))
            continue
        if today() != date:  # midnight passed while rendering: render again
            date, ours = today(), template()
        theirs = render_harmony(messages, date=date, **kwargs)
        text, reference = chat.decode(tokenizer, ours), encoding.decode(theirs)
        if text != reference:
            i = _first_difference(text, reference)
            differences.append(Difference(name, i, text[max(i - 40, 0):i + 60], reference[max(i - 40, 0):i + 60]))
        elif compare_ids and ours != theirs:  # same text, split into different tokens
            k = _first_difference(ours, theirs)
            i = len(chat.decode(tokenizer, ours[:k]))
            differences.append(Difference(f"{name} (token ids)", i, str(ours[max(k - 3, 0):k + 4]),
                                          str(theirs[max(k - 3, 0):k + 4])))
    return TemplateCheck([name for name, _, _ in PROBES], differences, compare_ids)
