"""Why nano's tool arguments go wrong: measure the copy, the attention that should carry it, and the output rows.

    python scripts/nano/diagnose_copy.py                                  # the shipped nano
    python scripts/nano/diagnose_copy.py --model <folder> --out diag.json # any nano-layout checkpoint (a run's export)

For held-out tool questions (heldout.json), per tool:
- `argument_p`: teacher forced on the model's own analysis and call header, the probability it gives each token of
  the expected argument values (mean over tokens and questions). Chance for a word of `build_data.WORDS` is 1/36.
- `attention_to_argument`: at the position that predicts the first argument token, the attention each head puts on
  the argument's tokens in the user's question; the best head per tool. A model that copies straight from the
  question has a head here (nano v2: layer 3 head 3 for `multiply`'s digits, and no head for a word). nano v3 and v4 copy
  through their analysis (`tool_hops` names the argument just before the call), so its figure stays low while
  `argument_p` is high.
- `greedy_right`: the share of greedy calls with the right function and arguments (as evaluate.py counts them).
And per argument vocabulary (WORDS, capitals, countries, digits), how far apart their output rows (`lm_head`) and
input embeddings are (mean pairwise distance over the vocabulary's mean row norm; random tokens give about 1.5):
output rows close together cannot be told apart by any copy.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build_data  # noqa: E402


def _value_spans(text: str, arguments: dict) -> list[tuple[int, int]]:
    """Character spans of the argument values inside the JSON text of the call."""
    spans, start = [], 0
    for value in arguments.values():
        v = json.dumps(value)
        v = v[1:-1] if isinstance(value, str) else v
        i = text.index(v, start)
        spans.append((i, i + len(v)))
        start = i + len(v)
    return spans


def _question_positions(tokenizer, prompt: list[int], arguments: dict) -> list[int]:
    """Positions of the argument's tokens inside the user's message of the rendered prompt."""
    start = tokenizer.convert_tokens_to_ids("<|start|>")
    user = max(i for i in range(len(prompt) - 2) if prompt[i] == start
               and tokenizer.decode(prompt[i + 1:i + 2]) == "user")
    end = prompt.index(tokenizer.convert_tokens_to_ids("<|end|>"), user)
    values = "".join(str(v) for v in arguments.values())
    return [i for i in range(user + 3, end) if (piece := tokenizer.decode(prompt[i:i + 1]).strip()) and piece in values]


def _row_spread(weight: torch.Tensor, ids: list[int]) -> float:
    """Mean pairwise distance between the rows, in units of the vocabulary's mean row norm (rows centred on the
    vocabulary's mean row). Two output rows at distance d can be told apart by at most d logits per unit of
    hidden state: rows with a small spread look alike to every copy."""
    w = weight.float()
    w = w - w.mean(dim=0)
    rows = w[ids]
    dist = torch.cdist(rows, rows)
    off = ~torch.eye(len(ids), dtype=torch.bool)
    return round(float(dist[off].mean() / w.norm(dim=-1).mean()), 3)


def vocabulary_collapse(session) -> dict:
    """How far apart the output rows and input embeddings of each argument vocabulary are (single tokens only)."""
    tok, model = session.tokenizer, session.model
    groups = {"words": build_data.WORDS, "capitals": [c for _, c in build_data.CAPITALS],
              "countries": [c for c, _ in build_data.CAPITALS], "digits": [str(d) for d in range(10)]}
    out = {}
    with torch.no_grad():
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        for name, words in groups.items():
            for form, prefix in (("after_space", " "), ("after_quote", "")):
                ids = [t[0] for w in words if len(t := tok(prefix + w, add_special_tokens=False)["input_ids"]) == 1]
                if len(ids) < 2:
                    continue
                out[f"{name}_{form}"] = {"tokens": len(ids), "output_rows_spread": _row_spread(head, ids),
                                         "input_rows_spread": _row_spread(embed, ids)}
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(len(tok) - 32, (64,), generator=gen).tolist()
        out["random_tokens"] = {"tokens": 64, "output_rows_spread": _row_spread(head, ids),
                                "input_rows_spread": _row_spread(embed, ids)}
    return out


def diagnose(session, questions: list[dict]) -> dict:
    from workbench.analysis import behaviour

    tok = session.tokenizer
    message = tok.convert_tokens_to_ids("<|message|>")
    per_tool: dict[str, dict] = {}
    by_effort: dict[str, list[dict]] = {}
    for q in questions:
        by_effort.setdefault(q["effort"], []).append(q)
    for effort, qs in by_effort.items():
        calls = behaviour.call_tools(session, [q["question"] for q in qs], [q["tools"] for q in qs],
                                     reasoning_effort=effort)
        right = calls.right([(q["tool"], q["arguments"]) for q in qs])
        for q, ids, ok in zip(qs, calls.token_ids, right):
            row = per_tool.setdefault(q["tool"], {"n": 0, "greedy_right": 0, "argument_p": [], "attention": []})
            row["n"] += 1
            row["greedy_right"] += int(ok)
            if message not in ids[1:] or len(ids) < 2:
                continue  # no call header to teacher-force from
            prompt = session.render(q["question"], reasoning_effort=effort, tools=q["tools"])
            header = ids[:len(ids) - ids[::-1].index(message)]  # the model's own analysis and call header
            text = json.dumps(q["arguments"])
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            spans = _value_spans(text, q["arguments"])
            value_tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"])
                            if any(a < e and b > s for s, e in spans)]
            full = prompt + header + enc["input_ids"]
            first = len(prompt) + len(header)
            t = session.trace(full, what=["attention", "logits"])  # one forward: the logits and every pattern
            probs = t["logits"].softmax(-1)
            row["argument_p"] += [float(probs[first + i - 1, full[first + i]]) for i in value_tokens]
            source = _question_positions(tok, prompt, q["arguments"])
            if not source or not value_tokens:
                continue
            at = first + value_tokens[0] - 1
            row["attention"].append({(layer, head): float(t.attention(layer, head)[at, source].sum())
                                     for layer in t.attention_layers for head in range(t.num_heads)})
    out = {}
    for name, row in sorted(per_tool.items()):
        heads = {}
        for rec in row["attention"]:
            for key, v in rec.items():
                heads[key] = heads.get(key, 0.0) + v / len(row["attention"])
        best = max(heads.items(), key=lambda kv: kv[1]) if heads else ((None, None), float("nan"))
        out[name] = {"n": row["n"], "greedy_right": round(row["greedy_right"] / row["n"], 3),
                     "argument_p": round(sum(row["argument_p"]) / max(1, len(row["argument_p"])), 3),
                     "attention_to_argument": {"best_layer": best[0][0], "best_head": best[0][1],
                                               "mass": round(best[1], 3)}}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=pathlib.Path, default=None, help="a checkpoint folder (default: nano, bf16)")
    ap.add_argument("--n", type=int, default=60, help="held-out tool questions to use")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)

    import workbench as wb
    from workbench.fixtures.nano import heldout, nano_path

    session = wb.load(str(args.model or nano_path("bf16")), preset="bf16")
    questions = heldout()["tool_questions"][:args.n]
    result = {"model": str(args.model or "nano (shipped)"), "tools": diagnose(session, questions),
              "vocabulary": vocabulary_collapse(session)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
