"""behaviour.ask: many greedy answers at once equal s.chat's one by one, under interventions too; bad input is refused."""
import pytest

import workbench as wb
from workbench.analysis import behaviour
from workbench.errors import WorkbenchError
from workbench.fixtures import nano_path
from workbench.fixtures.nano import heldout


@pytest.fixture(scope="module")
def nano():
    return wb.load(str(nano_path()), preset="cpu")


def one_by_one(s, questions, effort):
    return [s.chat(q, reasoning_effort=effort, temperature=0, max_new_tokens=96).channels.get("final", "").strip()
            for q in questions]


def test_a_padded_batch_answers_like_chat_one_by_one(nano):
    held = heldout()
    questions = held["arith_questions"][::150][:5] + [c["question"] for c in held["capital_questions"][:3]]
    answers = behaviour.ask(nano, questions, reasoning_effort="medium", batch=8)
    assert answers.finals == one_by_one(nano, questions, "medium")
    assert len(answers) == len(questions) and all(answers.form_ok)
    expected = [str(a + b) for a, b in held["heldout_sums"][::150][:5]] + [c["answer"] for c in held["capital_questions"][:3]]
    assert answers.accuracy(expected) == sum(answers.right(expected)) / len(questions)


def test_interventions_act_on_every_answer(nano):
    questions = heldout()["arith_questions"][:4]
    with nano.ablate_experts({0: [0, 1, 2, 3, 4, 5]}):
        inside = behaviour.ask(nano, questions, batch=3)
        assert inside.finals == one_by_one(nano, questions, "medium")
    assert behaviour.ask(nano, questions).finals == one_by_one(nano, questions, "medium")


def test_bad_input_is_refused_with_what_to_do(nano):
    with pytest.raises(WorkbenchError, match="list of questions.*s.chat"):
        behaviour.ask(nano, "What is 2 + 2?")
    with pytest.raises(WorkbenchError, match="must be a str"):
        behaviour.ask(nano, ["What is 2 + 2?", 3])
    with pytest.raises(WorkbenchError, match="at least 1"):
        behaviour.ask(nano, ["What is 2 + 2?"], max_new_tokens=0)
    answers = behaviour.ask(nano, ["What is 2 + 2?"], max_new_tokens=4)
    with pytest.raises(WorkbenchError, match="1 expected answers for 1 questions|2 expected answers for 1"):
        answers.accuracy(["4", "5"])


MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiplies two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
WORD_LENGTH = {"type": "function", "function": {
    "name": "word_length", "description": "Counts the letters of a word",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}


def test_tool_calls_in_a_batch_are_the_calls_chat_writes_one_by_one(nano):
    """call_tools parses each greedy answer as a harmony call (recipient, JSON arguments, <|call|>); a padded batch
    writes what s.chat writes for each question alone. nano calls multiply with the question's numbers (its
    measured 100%); for word_length it names the function but not the word (eval.json: 3%)."""
    questions = ["What is 862 times 29?", "What is 125 times 33?", "How many letters are in the word cat?"]
    tools = [[MULTIPLY], [MULTIPLY, WORD_LENGTH], [WORD_LENGTH]]
    calls = behaviour.call_tools(nano, questions, tools, reasoning_effort="low", batch=3)
    for q, t, f, a, ok in zip(questions, tools, calls.functions, calls.arguments, calls.form_ok):
        g = nano.chat(q, tools=t, reasoning_effort="low", temperature=0, max_new_tokens=96)
        assert ok == (g.finish_reason == "stop" and [m["channel"] for m in g.messages] == ["analysis", "commentary"])
        assert f"functions.{f}" == g.messages[-1]["recipient"]
    assert calls.right([("multiply", {"a": 862, "b": 29}), ("multiply", {"a": 125, "b": 33}),
                        ("word_length", {"word": "cat"})])[:2] == [True, True]
    assert calls.functions[2] == "word_length" and calls.form_ok[2]
    with pytest.raises(WorkbenchError, match="2 tool lists for 3 questions"):
        behaviour.call_tools(nano, questions, [[MULTIPLY], [MULTIPLY]])
