"""gpt-oss-nano, evaluation: writes eval.json and MODEL_CARD.md next to the checkpoints.

    python scripts/nano/evaluate.py [--fixture workbench/fixtures/nano] [--build DIR] [--init DIR] [--quick]

Measured (all on held-out data the model never trained on):
  loss        per-token loss per data kind vs a unigram baseline (training-token frequencies) on the same tokens
  harmony     share of greedy completions of held-out questions (prompt from apply_chat_template(...,
              add_generation_prompt=True)) that parse into an analysis message then a final message ending in
              <|return|>; tool questions: analysis, then a call on commentary to the right function with the
              right JSON arguments, ending in <|call|>; answer accuracy per kind and reasoning effort
  arithmetic  accuracy on held-out sums (pairs never seen in training), per reasoning effort
  routing     mutual information (bits) between a token's kind and its top-1 expert, per layer, trained vs
              the untrained initialisation (same seed); read from workbench traces
  sinks       per-head mean attention-sink mass on held-out text, trained vs initialisation (workbench traces)
  mxfp4       share of (token, layer) top-k expert sets unchanged between the bf16 and the mxfp4 checkpoint,
              and the bf16 router margins (k-th minus (k+1)-th logit) where the sets flip
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build_data  # noqa: E402

from workbench.fixtures.nano import mutual_information, token_kinds  # noqa: E402  (shared with the tests)


def entropy(xs: list) -> float:
    n = len(xs)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(xs).values())


# ---- held-out texts ---------------------------------------------------------------------------

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def heldout_windows(tokenizer, test_rows, kind: str, max_tokens: int, seq_len: int = 256) -> list[list[int]]:
    """Non-overlapping windows of seq_len+1 tokens from the kind's held-out documents, up to max_tokens."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for r in test_rows:
        if r["kind"] == kind:
            stream += tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [eot]
        if len(stream) > max_tokens + seq_len + 1:
            break
    n = min(len(stream) - 1, max_tokens) // seq_len
    return [stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)]


def trace_texts(tokenizer, test_rows, per_kind: int = 2, max_len: int = 256) -> list[list[int]]:
    """Held-out token sequences of every data kind, for routing and sink figures."""
    out = []
    for kind in ("prose", "code") + build_data.SYNTHETIC_KINDS:
        docs = [r["text"] for r in test_rows if r["kind"] == kind][:per_kind * 3]
        taken = 0
        for d in docs:
            ids = tokenizer(d, add_special_tokens=False)["input_ids"]
            if kind in ("prose", "code"):  # skip the file's first lines (licence headers, titles)
                ids = ids[len(ids) // 4:]
            if len(ids) >= 64:
                out.append(ids[:max_len])
                taken += 1
            if taken == per_kind:
                break
    return out


# ---- figures ----------------------------------------------------------------------------------

@torch.no_grad()
def losses_vs_unigram(model, tokenizer, test_rows, unigram_logp: dict, max_tokens: int) -> dict:
    out = {}
    model.eval()
    for kind in ("prose", "code") + build_data.SYNTHETIC_KINDS:
        windows = heldout_windows(tokenizer, test_rows, kind, max_tokens)
        if not windows:
            continue
        total, base, n = 0.0, 0.0, 0
        for i in range(0, len(windows), 8):
            x = torch.tensor(windows[i:i + 8])
            logits = model(input_ids=x[:, :-1]).logits.float()
            y = x[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            base += float(-unigram_logp[kind][y].sum())
            n += y.numel()
        out[kind] = {"model_loss": round(total / n, 4), "unigram_loss": round(base / n, 4), "tokens": n,
                     "model_perplexity": round(math.exp(total / n), 2), "unigram_perplexity": round(math.exp(base / n), 1)}
    return out


def unigram_logprobs(build: pathlib.Path, vocab: int) -> dict[str, torch.Tensor]:
    """Per kind: log p(token) from that kind's training tokens, add-one smoothed."""
    streams = torch.load(build / "tokens.pt")["train"]
    out = {}
    for kind, s in streams.items():
        c = torch.bincount(s["ids"].long(), minlength=vocab).double() + 1.0
        out[kind] = (c / c.sum()).log().float()
    return out


def _prompt_ids(tokenizer, q) -> list[int]:
    kwargs = {"reasoning_effort": q["effort"], "add_generation_prompt": True}
    if q.get("tools"):
        kwargs["tools"] = q["tools"]
    ids = tokenizer.apply_chat_template(q["prompt"], tokenize=True, **kwargs)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int = 32) -> list[list[int]]:
    """Greedy completions, batched with left padding; each cut at its first stop token."""
    from workbench.analysis import behaviour

    return behaviour.complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch=batch)


def harmony_and_accuracy(model, tokenizer, questions: list[dict], max_new_tokens: int = 200) -> dict:
    """Form and answers of greedy completions of held-out questions."""
    from workbench.chat import harmony as chat

    ret, call = tokenizer.convert_tokens_to_ids("<|return|>"), tokenizer.convert_tokens_to_ids("<|call|>")
    t0 = time.time()
    completions = greedy(model, tokenizer, [_prompt_ids(tokenizer, q) for q in questions], max_new_tokens)
    seconds = time.time() - t0
    rows = []
    for q, ids in zip(questions, completions):
        p = chat.parse(tokenizer, ids)
        msgs = [(m["channel"], m.get("recipient")) for m in p.messages]
        final = p.channels.get("final", "").strip()
        if q["kind"] == "tool":
            ok_form = (len(msgs) == 2 and msgs[0] == ("analysis", None) and msgs[1][0] == "commentary"
                       and bool(ids) and ids[-1] == call)
            correct = False
            if ok_form and msgs[1][1] == f"functions.{q['tool']}":
                try:
                    correct = json.loads(p.messages[1]["content"]) == q["arguments"]
                except ValueError:
                    correct = False
        else:
            ok_form = len(msgs) == 2 and msgs == [("analysis", None), ("final", None)] and bool(ids) and ids[-1] == ret
            correct = ok_form and final == q["answer"]
        rows.append({"kind": q["kind"], "effort": q["effort"], "task": q.get("task") or q.get("tool"), "form": ok_form,
                     "correct": bool(correct), "question": q["prompt"][0]["content"], "expected": q["answer"],
                     "analysis": p.channels.get("analysis", ""), "final": final, "n_tokens": len(ids)})

    def share(rs, key):
        return round(sum(r[key] for r in rs) / len(rs), 4) if rs else None

    plain = [r for r in rows if r["kind"] != "tool"]
    tools = [r for r in rows if r["kind"] == "tool"]
    by = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        by[kind] = {"n": len(rs), "form": share(rs, "form"), "correct": share(rs, "correct"),
                    "by_effort": {e: {"n": len([r for r in rs if r["effort"] == e]),
                                      "form": share([r for r in rs if r["effort"] == e], "form"),
                                      "correct": share([r for r in rs if r["effort"] == e], "correct")}
                                  for e in build_data.EFFORTS}}
        tasks = sorted({r["task"] for r in rs if r["task"]})
        if tasks:
            by[kind]["by_task"] = {t: {"n": len([r for r in rs if r["task"] == t]),
                                       "correct": share([r for r in rs if r["task"] == t], "correct")} for t in tasks}
    wrong_arith = [r for r in rows if r["kind"] == "arith" and not r["correct"]][:8]
    return {"harmony_form_share": share(plain, "form"), "n_questions": len(plain),
            "tool_call_form_share": share(tools, "form"), "tool_call_correct_share": share(tools, "correct"),
            "n_tool_questions": len(tools), "by_kind": by, "generation_seconds": round(seconds, 1),
            "examples": {"arith": [r for r in rows if r["kind"] == "arith"][:3], "arith_wrong": wrong_arith,
                         "tool": tools[:2], "dates": [r for r in rows if r["kind"] == "dates"][:2]}}


def routing_and_sinks(path: pathlib.Path, sequences: list[list[int]], preset: str = "cpu") -> dict:
    """MI(token kind; top-1 expert) per layer and per-head mean sink mass, from workbench traces."""
    import workbench

    s = workbench.load(str(path), preset=preset)
    kinds, top1, sink_sum, sink_n = [], None, None, 0
    for ids in sequences:
        t = s.trace(ids)
        idx = t.routing.indices  # [layers, tokens, k], sorted by router logit: [..., 0] is the top-1 expert
        top1 = idx[:, :, 0] if top1 is None else torch.cat([top1, idx[:, :, 0]], dim=1)
        kinds += token_kinds(s.tokenizer, ids)
        sm = t.sink_mass.float()  # [layers, heads, tokens]
        sink_sum = sm.sum(-1) if sink_sum is None else sink_sum + sm.sum(-1)
        sink_n += sm.shape[-1]
    mi = [round(mutual_information(kinds, top1[l].tolist()), 4) for l in range(top1.shape[0])]
    usage = [torch.bincount(top1[l], minlength=s.model.config.num_local_experts).tolist() for l in range(top1.shape[0])]
    return {"mi_bits_per_layer": mi, "kind_entropy_bits": round(entropy(kinds), 4),
            "expert_entropy_bits_per_layer": [round(entropy(top1[l].tolist()), 4) for l in range(top1.shape[0])],
            "top1_usage_per_layer": usage, "tokens": len(kinds),
            "kind_counts": dict(collections.Counter(kinds)),
            "sink_mass_per_head": [[round(float(v), 4) for v in row] for row in (sink_sum / sink_n)],
            "sink_mass_mean": round(float((sink_sum / sink_n).mean()), 4)}


def mxfp4_vs_bf16(fixture: pathlib.Path, sequences: list[list[int]]) -> dict:
    """Top-k sets of every (token, layer): bf16 checkpoint (preset bf16) vs mxfp4 checkpoint (preset mxfp4)."""
    import workbench

    runs = {}
    for layout in ("bf16", "mxfp4"):
        s = workbench.load(str(fixture / layout), preset=layout)
        runs[layout] = [s.trace(ids, what=["routing"]) for ids in sequences]
        runs[layout + "_report"] = {"fallback": s.report.fallback, "quantization": s.report.actual_quantization}
    same, total, margins_flip, margins_all, per_layer = 0, 0, [], [], collections.defaultdict(lambda: [0, 0])
    for a, b in zip(runs["bf16"], runs["mxfp4"]):
        ia, ib = a.routing.indices.sort(-1).values, b.routing.indices.sort(-1).values
        k = ia.shape[-1]
        top = a.routing.logits.float().topk(k + 1, dim=-1).values
        margin = top[..., k - 1] - top[..., k]  # [layers, tokens]
        eq = (ia == ib).all(-1)
        same += int(eq.sum())
        total += eq.numel()
        margins_all += margin.flatten().tolist()
        margins_flip += margin[~eq].tolist()
        for l, layer in enumerate(a.routing.layers):
            per_layer[layer][0] += int(eq[l].sum())
            per_layer[layer][1] += eq[l].numel()

    def q(xs, p):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 4) if xs else None

    return {"unchanged_share": round(same / total, 4), "pairs": total, "flips": total - same,
            "unchanged_share_per_layer": {str(l): round(v[0] / v[1], 4) for l, v in sorted(per_layer.items())},
            "margin_at_flips": {"median": q(margins_flip, 0.5), "p90": q(margins_flip, 0.9), "max": q(margins_flip, 1.0)},
            "margin_all": {"median": q(margins_all, 0.5), "p10": q(margins_all, 0.1)},
            "share_of_flips_with_margin_below_p10_of_all": (round(sum(m < q(margins_all, 0.1) for m in margins_flip)
                                                             / len(margins_flip), 4) if margins_flip else None),
            "mxfp4_load": runs["mxfp4_report"]}


# ---- main -------------------------------------------------------------------------------------

def targeted_questions(seed: int) -> list[dict]:
    """Questions the targets are measured on, beyond the held-out conversation mix:
    every held-out sum (pairs never seen in training) at medium effort, 150 of them at low and at high; every
    country's capital in a trained phrasing under each effort (the facts are trained, these conversations are
    new); the unseen phrasing is the `facts` kind of the held-out mix."""
    import random

    held = sorted(build_data.heldout_sums(seed))
    rng = random.Random(f"{seed}-targets")
    qs = []
    for effort, pairs in (("medium", held), ("low", rng.sample(held, 150)), ("high", rng.sample(held, 150))):
        for a, b in pairs:
            qs.append({"kind": "arith", "effort": effort, "tools": None, "answer": str(a + b), "a": a, "b": b,
                       "prompt": [{"role": "user", "content": build_data.ARITH_TEMPLATES[0].format(a=a, b=b)}]})
    for country, capital in build_data.CAPITALS:
        for effort in build_data.EFFORTS:
            qs.append({"kind": "facts", "effort": effort, "tools": None, "answer": capital,
                       "prompt": [{"role": "user", "content": build_data.FACT_TEMPLATES_TRAIN[0].format(c=country)}]})
    return qs + build_data.unseen_tool_questions(seed)


def targets(model, tokenizer, seed: int) -> dict:
    r = harmony_and_accuracy(model, tokenizer, targeted_questions(seed), max_new_tokens=120)
    ar, fa, to = r["by_kind"]["arith"], r["by_kind"]["facts"], r["by_kind"]["tool"]
    return {"heldout_sums": {"n": ar["n"], "by_effort": ar["by_effort"]},
            "capitals_trained_phrasing": {"n": fa["n"], "correct": fa["correct"], "by_effort": fa["by_effort"]},
            "tool_calls_unseen_phrasing": {"n": to["n"], "correct": to["correct"], "form": to["form"],
                                           "by_effort": to["by_effort"], "by_task": to["by_task"]},
            "harmony_form_share": r["harmony_form_share"], "generation_seconds": r["generation_seconds"],
            "arith_wrong_examples": r["examples"]["arith_wrong"]}


def expert_ablation(session, seed: int, n: int = 64) -> dict:
    """Held-out sums right (medium effort) with each expert of each layer switched off in turn (re-routed: the
    router's top-k over the rest), the lesson of notebook 06 measured on more sums than the notebook asks."""
    from workbench.analysis import behaviour

    held = sorted(build_data.heldout_sums(seed))
    pairs = held[:: max(1, len(held) // n)][:n]
    questions, expected = [f"What is {a} + {b}?" for a, b in pairs], [str(a + b) for a, b in pairs]
    config = session.model.config
    base = behaviour.ask(session, questions).accuracy(expected)
    grid = []
    for layer in range(config.num_hidden_layers):
        row = []
        for e in range(config.num_local_experts):
            with session.ablate_experts({layer: [e]}):
                row.append(round(behaviour.ask(session, questions).accuracy(expected), 4))
        grid.append(row)
    return {"n_sums": n, "pairs": pairs, "as_trained": round(base, 4), "accuracy_with_expert_off": grid,
            "needed": needed_expert(grid)}


def needed_expert(grid: list[list[float]]) -> dict:
    """The expert that stands out from its layer: in the layer where the gap between the most harmful expert's
    ablation and the next most harmful one is largest (a layer where several experts are each indispensable holds
    no single standout)."""
    def gap(row):
        low = sorted(row)
        return low[1] - low[0]
    layer = max(range(len(grid)), key=lambda l: gap(grid[l]))
    expert = min(range(len(grid[layer])), key=lambda e: grid[layer][e])
    return {"layer": layer, "expert": expert, "accuracy": grid[layer][expert], "gap_to_next": round(gap(grid[layer]), 4)}


def main(argv=None):
    import train as train_script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=pathlib.Path, default=train_script.FIXTURE_DIR)
    ap.add_argument("--build", type=pathlib.Path, default=build_data.DEFAULT_OUT)
    ap.add_argument("--init", type=pathlib.Path, default=None, help="the untrained init checkpoint (default <build>/init)")
    ap.add_argument("--quick", action="store_true", help="a few questions only (smoke runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import workbench
    from transformers import AutoTokenizer

    t0 = time.time()
    fixture, build = args.fixture, args.build
    init_dir = args.init or build / "init"
    tokenizer = AutoTokenizer.from_pretrained(fixture / "bf16")
    test_rows = read_jsonl(build / "test.jsonl")
    held = json.loads((build / "heldout.json").read_text())
    questions = held["questions"]
    if args.quick:
        questions = [q for i, q in enumerate(questions) if i % 25 == 0]
    result: dict = {"heldout": {"sums_held_out": len(held["heldout_sums"]), "questions": len(questions)}}

    s = workbench.load(str(fixture / "bf16"), preset="cpu")
    model = s.model
    unigram = unigram_logprobs(build, len(tokenizer))
    result["loss"] = losses_vs_unigram(model, tokenizer, test_rows, unigram, 2048 if args.quick else 16384)
    print("loss", json.dumps(result["loss"]), flush=True)
    result["harmony"] = harmony_and_accuracy(model, tokenizer, questions)
    ar = result["harmony"]["by_kind"].get("arith", {})
    result["arithmetic"] = {"heldout_sum_accuracy": ar.get("correct"), "n": ar.get("n"),
                            "by_effort": {e: v["correct"] for e, v in ar.get("by_effort", {}).items()}}
    print("harmony", result["harmony"]["harmony_form_share"], "arith", result["arithmetic"], flush=True)
    if not args.quick:
        result["targets"] = targets(model, tokenizer, held["seed"])
        print("targets", json.dumps({k: v for k, v in result["targets"].items() if k != "arith_wrong_examples"}),
              flush=True)
        result["expert_ablation"] = expert_ablation(s, held["seed"])
        print("expert ablation", json.dumps({k: v for k, v in result["expert_ablation"].items() if k != "pairs"}),
              flush=True)

    sequences = trace_texts(tokenizer, test_rows, per_kind=1 if args.quick else 3)
    shipped = json.loads((fixture / "heldout.json").read_text())
    shipped["trace_sequences"] = sequences  # the tests re-measure routing on exactly these tokens
    (fixture / "heldout.json").write_text(json.dumps(shipped, separators=(",", ":")) + "\n")
    result["routing_and_sinks"] = {"trained": routing_and_sinks(fixture / "bf16", sequences),
                                   "init": routing_and_sinks(init_dir, sequences),
                                   "sequences": len(sequences)}
    rs = result["routing_and_sinks"]
    # A third of the sequences (the first of each data kind), measured the same way: what the fast test re-measures.
    subset = list(range(0, len(sequences), 3))
    rs["test_subset"] = {"sequence_indices": subset}
    for name, path in (("trained", fixture / "bf16"), ("init", init_dir)):
        rs["test_subset"][f"{name}_mi_bits_per_layer"] = routing_and_sinks(path, [sequences[i] for i in subset])["mi_bits_per_layer"]
    print("MI trained", rs["trained"]["mi_bits_per_layer"], "init", rs["init"]["mi_bits_per_layer"], flush=True)
    result["mxfp4"] = mxfp4_vs_bf16(fixture, sequences)
    print("mxfp4", json.dumps({k: v for k, v in result["mxfp4"].items() if k != "mxfp4_load"}), flush=True)
    result["eval_seconds"] = round(time.time() - t0, 1)
    (fixture / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    import model_card
    model_card.write(fixture, build)
    print(f"wrote {fixture / 'eval.json'} and MODEL_CARD.md ({result['eval_seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
