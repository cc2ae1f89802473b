"""Speed of generation through the widget (session.stream + widget thread + batched traitlet updates +
token inspector chips at the end) vs plain `model.generate`, headless, driven from Python.

SmolLM2-135M-Instruct, greedy, same prompt, exactly N new tokens on both sides (stop tokens disabled).
Repetitions are interleaved (plain, widget, widget, plain, ...); the figure that matters is the median of
the per-pair ratios. Without a kernel the widgets' comms are no-ops, so this measures the Python side of the
widget (thread hand-off, parsing, batching, rendering HTML), not the browser. Results go to
benchmarks/results.json under "widget" (other benchmarks keep their own keys).

    python benchmarks/bench_widget.py [--tokens 128] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

# As in bench_generation.py: on this small shared CPU, OpenMP workers spin-wait between ops and steal the
# core the next op needs, which penalises whichever side runs in the main thread. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from results_file import RESULTS, record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import workbench as wb
from workbench.chat import harmony as chat
from workbench.fixtures.checkpoints import smollm2_path
from workbench.ui.widget import GenerationWidget, widget

PROMPT = "Write a long story about a cat."


def time_plain(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=[], pad_token_id=0)  # no stop token: exactly n
    seconds = time.perf_counter() - t
    assert out.shape[1] - len(prompt_ids) == n
    return seconds, out[0, len(prompt_ids):].tolist()


def time_widget(session, n):
    w = widget(session, temperature=0.0, max_new_tokens=n)
    updates = []
    w.observe(lambda ch: updates.append(1), "final_text")
    try:
        t = time.perf_counter()
        assert w.generate(PROMPT), w.error
        g = w.wait()
        seconds = time.perf_counter() - t
    finally:
        w.close()
    assert len(g.token_ids) == n, (len(g.token_ids), g.finish_reason)
    return seconds, g, len(updates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    n = args.tokens

    # Both sides run to exactly n tokens: the widget goes through session.stream, which asks
    # chat.stop_token_ids for its stop ids; an empty list lets it run past eos like plain generate here.
    chat.stop_token_ids = lambda tokenizer, generation_config=None: []
    session = wb.load(str(smollm2_path()), preset="cpu")
    model = session.model
    prompt_ids = session.render(PROMPT)

    _, plain_ids = time_plain(model, prompt_ids, n)  # warm-up, and the same-tokens check
    _, g, _ = time_widget(session, n)
    assert g.token_ids == plain_ids, "greedy tokens through the widget differ from plain generate"

    plain, ours, ratios, updates = [], [], [], []
    for rep in range(args.reps):
        order = ("plain", "widget") if rep % 2 == 0 else ("widget", "plain")
        pair = {}
        for which in order:
            if which == "plain":
                pair["plain"] = time_plain(model, prompt_ids, n)[0]
            else:
                pair["widget"], _, k = time_widget(session, n)
                updates.append(k)
        plain.append(n / pair["plain"])
        ours.append(n / pair["widget"])
        ratios.append(pair["plain"] / pair["widget"])

    result = {
        "model": "SmolLM2-135M-Instruct (float32, dequantized from GGUF Q4_1)",
        "prompt": PROMPT, "prompt_tokens": len(prompt_ids), "new_tokens": n, "repetitions": args.reps,
        "greedy": True, "stop_tokens": "disabled on both sides (exactly new_tokens each)",
        "plain_generate_tokens_per_s": [round(x, 2) for x in plain],
        "widget_tokens_per_s": [round(x, 2) for x in ours],
        "ratio_per_pair": [round(x, 4) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 4),
        "goal": ">= 0.95 (tokens/s from Generate to the widget's last update, over plain generate tokens/s)",
        "widget_final_text_updates_per_run": updates,
        "flush_interval_s": GenerationWidget.flush_interval,
        "headless": "driven from Python, no kernel or browser (comms are no-ops)",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
                    "transformers": transformers.__version__, "device": str(next(model.parameters()).device),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    record("widget", result)

    print(f"{'rep':>3}  {'plain tok/s':>11}  {'widget tok/s':>12}  {'ratio':>6}")
    for i, (p, o, r) in enumerate(zip(plain, ours, ratios)):
        print(f"{i:>3}  {p:>11.1f}  {o:>12.1f}  {r:>6.3f}")
    print(f"median ratio {result['median_ratio']:.3f} (goal >= 0.95); written to {RESULTS}")


if __name__ == "__main__":
    main()
