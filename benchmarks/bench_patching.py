"""Cost of activation patching vs the plain forwards it needs.

`s.patch(clean, corrupt, at=...)` runs one clean forward, one corrupt forward and ceil(sites / batch_size)
batched corrupt forwards (patch_cost says how many before running). The plain side runs exactly those forwards
with the same shapes (1 x T, 1 x T, then batch_size x T and the last, smaller batch) and the same arguments
(use_cache=False, logits_to_keep=1), without hooks. So the ratio is what caching, the hooks, the router
transforms and computing the metric add. Goal: <= 1.1x.

Models: SmolLM2-135M-Instruct (float32, the IOI prompt pair, 14 tokens; residual, mlp, attention_heads on every
third layer, 10 of 30, to keep the run short: one 8 x 14 forward costs ~1.3 CPU s here) and gpt-oss: the tiny random fixture (4 layers, 8 experts) and the trained gpt-oss-nano when present
(random token ids, 32 tokens, corrupt = clean with one token changed; all four site kinds). Batch size 8.

Repetitions are interleaved (plain, patch, plain, patch, ...) and the figure is the median of per-pair ratios of
CPU time on one torch thread (benchmarks/bench_tracing.py explains why). Results go to benchmarks/results.json
under "patching".

    python benchmarks/bench_patching.py [--reps 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_tracing import interleaved  # noqa: E402
from results_file import record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import workbench as wb  # noqa: E402
from workbench import fixtures  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.model.adapters import input_device  # noqa: E402

IOI = ("When John and Mary went to the store, John gave a drink to",
       "When John and Mary went to the store, Mary gave a drink to")


def case(s, clean, corrupt, at: str, batch_size: int, reps: int, answers=None, layers=None) -> dict:
    cost = s.patch(clean, corrupt, at=at, batch_size=batch_size, layers=layers, dry_run=True)
    ids = clean if isinstance(clean, list) else s.tokenizer(clean)["input_ids"]
    device = input_device(s.model)
    shapes = [1, 1] + [batch_size] * (cost.batches - 1) + [cost.sites - batch_size * (cost.batches - 1)]
    inputs = [torch.tensor([ids] * b, device=device) for b in shapes]

    def plain():
        with torch.no_grad():
            for x in inputs:
                s.model(input_ids=x, use_cache=False, logits_to_keep=1)

    def patch():
        s.patch(clean, corrupt, at=at, batch_size=batch_size, answers=answers, layers=layers, budget=None)

    result = interleaved(plain, {"patch": patch}, reps)
    print(f"  {at}: {cost.forwards} forwards, patch / plain CPU time {result['ratio_median_cpu']['patch']}", flush=True)
    return {"at": at, "tokens": cost.tokens, "layers": len(cost.layers), "sites": cost.sites,
            "batch_size": batch_size, "forwards": cost.forwards, "cached_bytes": cost.cached_bytes,
            "ratio_median_cpu": result["ratio_median_cpu"]["patch"],
            "ratio_median_wall": result["ratio_median_wall"]["patch"],
            "cpu_seconds_median": result["cpu_seconds_median"], "ratios_cpu": result["ratios_cpu"]["patch"]}


def moe_pair(s, tokens: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, s.model.config.vocab_size, (tokens,), generator=g).tolist()
    corrupt = list(clean)
    corrupt[tokens // 2] = (corrupt[tokens // 2] + 1) % s.model.config.vocab_size
    return clean, corrupt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7, help="repetitions for the gpt-oss models")
    parser.add_argument("--smollm2-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="prompt length for the gpt-oss models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"goal": "patch time / the same forwards without hooks <= 1.1 (CPU time, median of interleaved pairs)"}

    s = wb.load(str(fixtures.smollm2_path()), preset="cpu")
    print("SmolLM2", flush=True)
    out["smollm2"] = {"model": "SmolLM2-135M-Instruct (float32, preset cpu)", "prompts": list(IOI),
                      "layers": list(range(0, 30, 3)), "reps": args.smollm2_reps,
                      "cases": [case(s, *IOI, at, args.batch_size, args.smollm2_reps, layers=list(range(0, 30, 3)))
                                for at in ("residual", "mlp", "attention_heads")]}
    del s
    models = {"tiny_gpt_oss": ("tiny random gpt-oss fixture (4 layers, 8 experts top-4, hidden 64, float32)",
                               lambda: fixtures.tiny_checkpoint("gpt_oss"))}
    try:
        nano = fixtures.nano_path()
        models["gpt_oss_nano"] = ("gpt-oss-nano, trained (float32, preset cpu)", lambda: nano)
    except (AttributeError, WorkbenchError) as e:
        out["gpt_oss_nano"] = f"not measured: {e}"
    for key, (name, path) in models.items():
        s = wb.load(str(path()), preset="cpu")
        print(key, flush=True)
        clean, corrupt = moe_pair(s, args.tokens)
        out[key] = {"model": name, "prompts": f"{args.tokens} random token ids, one changed", "reps": args.reps,
                    "cases": [case(s, clean, corrupt, at, args.batch_size, args.reps, answers=(0, 1))
                              for at in ("residual", "mlp", "attention_heads", "experts")]}
    out.update(machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
               versions={"torch": torch.__version__, "transformers": transformers.__version__},
               date=time.strftime("%Y-%m-%d"))
    record("patching", out)
    for key in ("smollm2", "tiny_gpt_oss", "gpt_oss_nano"):
        if isinstance(out.get(key), dict):
            print(key, {c["at"]: (c["forwards"], c["ratio_median_cpu"]) for c in out[key]["cases"]})


if __name__ == "__main__":
    main()
