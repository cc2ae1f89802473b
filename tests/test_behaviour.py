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
