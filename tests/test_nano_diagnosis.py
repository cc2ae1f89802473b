"""scripts/nano/diagnose_copy.py, the instrument behind issue 16's tool-argument work: its figures equal the same
quantities computed independently with plain transformers (greedy generate, a forward, output_attentions)."""
import json
import pathlib
import sys

import pytest
import torch

import workbench as wb
from workbench.fixtures import nano_path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "nano"))
import diagnose_copy  # noqa: E402

QUESTIONS = [
    {"question": "Multiply 619 by 60.", "tool": "multiply", "arguments": {"a": 619, "b": 60}, "effort": "low"},
    {"question": "How many letters are in the word mouse?", "tool": "word_length", "arguments": {"word": "mouse"},
     "effort": "low"},
]


@pytest.fixture(scope="module")
def session():
    return wb.load(str(nano_path("bf16")), preset="bf16")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = nano_path("bf16")
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval(),
            AutoTokenizer.from_pretrained(folder))


def _tools():
    import build_data

    return [build_data.TOOLS[name] for name in ("multiply", "word_length", "get_weather")]


@pytest.mark.parametrize("index", range(len(QUESTIONS)))
def test_argument_probability_and_attention_equal_plain_transformers(session, reference, index):
    q = dict(QUESTIONS[index], tools=_tools())
    got = diagnose_copy.diagnose(session, [q])[q["tool"]]
    model, tok = reference
    prompt = tok.apply_chat_template([{"role": "user", "content": q["question"]}], tools=q["tools"],
                                     reasoning_effort=q["effort"], add_generation_prompt=True, tokenize=False)
    prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    assert prompt == session.render(q["question"], reasoning_effort=q["effort"], tools=q["tools"])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=96, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids(["<|call|>", "<|return|>"]))
    completion = out[0, len(prompt):].tolist()
    message = tok.convert_tokens_to_ids("<|message|>")
    header = completion[:len(completion) - completion[::-1].index(message)]
    call = json.dumps(q["arguments"])
    enc = tok(call, add_special_tokens=False, return_offsets_mapping=True)
    value_text = "".join(str(v) for v in q["arguments"].values())
    starts = {call.index(str(v)) for v in q["arguments"].values()}
    ends = {call.index(str(v)) + len(str(v)) for v in q["arguments"].values()}
    value_tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"])
                    if any(s < b and a < e for s, e in zip(sorted(starts), sorted(ends)))]
    full = prompt + header + enc["input_ids"]
    first = len(prompt) + len(header)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([full]), output_attentions=True)
    probs = out.logits[0].float().softmax(-1)
    p = [float(probs[first + i - 1, full[first + i]]) for i in value_tokens]
    assert got["argument_p"] == pytest.approx(sum(p) / len(p), abs=2e-3)
    # the best head's attention mass on the argument's tokens in the question
    user = max(i for i, t in enumerate(prompt) if tok.decode([t]) == "user")
    end = prompt.index(tok.convert_tokens_to_ids("<|end|>"), user)
    source = [i for i in range(user + 2, end) if (s := tok.decode(prompt[i:i + 1]).strip()) and s in value_text]
    at = first + value_tokens[0] - 1
    best = got["attention_to_argument"]
    mass = float(out.attentions[best["best_layer"]][0, best["best_head"], at, source].float().sum())
    assert best["mass"] == pytest.approx(mass, abs=2e-2)
    every = [float(a[0, h, at, source].float().sum()) for a in out.attentions for h in range(a.shape[1])]
    assert best["mass"] >= max(every) - 2e-2
    assert got["greedy_right"] in (0.0, 1.0)


def test_row_spread_equals_the_pairwise_distance_over_the_mean_norm(session):
    got = diagnose_copy.vocabulary_collapse(session)
    w = session.model.get_output_embeddings().weight.detach().float()
    w = w - w.mean(0)
    ids = [session.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    rows = w[ids]
    pairs = [float((rows[i] - rows[j]).norm()) for i in range(10) for j in range(10) if i != j]
    assert got["digits_after_quote"]["output_rows_spread"] == pytest.approx(
        sum(pairs) / len(pairs) / float(w.norm(dim=-1).mean()), abs=1e-3)
    assert set(got) >= {"words_after_space", "capitals_after_space", "countries_after_space", "random_tokens"}
