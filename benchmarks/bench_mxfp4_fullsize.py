"""Full-size gpt-oss-20b on this machine with the packed MXFP4 path: memory, load time, prefill, decode, traces.

Writes a random gpt-oss-20b in the real MXFP4 checkpoint layout from the bundled config (~13.8 GB, seeded, shard
by shard: benchmarks/random_gpt_oss.py), loads it with `preset="mxfp4"` (no native kernels here: the packed
path) and measures, in one process:

- resident memory (RSS) after load against the plan (goal <= 16 GB and within 10% of the plan);
- load time; prefill throughput over 256 tokens (goal >= 10 tok/s);
- decode tokens/s without and with the expert cache (goal >= 2 tok/s);
- a 256-token routing trace and a 1,024-token attention trace within the default budget (2 GB);
- the plan of transformers' own path (every expert dequantized to bf16, ~42 GB), which cannot load here.

Random weights route differently from the real model, so the expert cache's hit rate here says little about
real text. This is a benchmark, not a test (the tests run the same code at small size). The checkpoint is
deleted afterwards unless --keep. Figures go to benchmarks/results.json under "mxfp4_fullsize".

    nohup python benchmarks/bench_mxfp4_fullsize.py > /tmp/bench_mxfp4.log 2>&1 &
    python benchmarks/bench_mxfp4_fullsize.py --decode-tokens 4 --cache 2GB --folder /tmp/gpt-oss-20b-random
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py

import psutil
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from random_gpt_oss import folder_bytes, gpt_oss_config, write_random_mxfp4
from results_file import record

import workbench as wb
from workbench.model import mxfp4_packed
from workbench.sizes import format_bytes

GB = 10**9


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(fn) -> tuple[object, dict]:
    """(fn(), {wall seconds, CPU seconds of this process, load average}): on a shared machine the CPU time is
    the steadier measure, the wall time what this machine gave at that load."""
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
                 "load_average": round((load + os.getloadavg()[0]) / 2, 1)}


def rates(tokens: int, t: dict) -> dict:
    return {**t, "tokens": tokens, "tokens_per_s": round(tokens / t["wall_s"], 3),
            "tokens_per_cpu_s": round(tokens / t["cpu_s"], 3)}


def decode(model, prompt: torch.Tensor, steps: int) -> dict:
    """Greedy decode with the KV cache: prefill `prompt`, then `steps` single-token forwards (timed together)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        state = {"past": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

        def steps_():
            for _ in range(steps):
                o = model(input_ids=state["token"], past_key_values=state["past"], use_cache=True)
                state["past"], state["token"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
        _, t = timed(steps_)
    return rates(steps, t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default="/tmp/workbench-gpt-oss-20b-random")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--cache", default="2GB", help="expert cache budget for the cached decode")
    parser.add_argument("--keep", action="store_true", help="keep the 13.8 GB checkpoint afterwards")
    parser.add_argument("--size", default="20b", choices=["20b", "tiny"],
                        help="tiny: the same steps on a tiny config in seconds, to check the script (not recorded)")
    args = parser.parse_args()
    if args.size == "tiny" and args.folder == parser.get_default("folder"):
        args.folder += "-tiny"
    folder = pathlib.Path(args.folder)
    result: dict = {"model": "random gpt-oss-20b (bundled config), MXFP4 checkpoint layout, seed 0",
                    "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "ram_bytes": psutil.virtual_memory().total, "torch": torch.__version__,
                                "transformers": transformers.__version__, "processor": platform.machine()},
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        config = gpt_oss_config(args.size)
        plans = {"mxfp4": wb.plan(config, "mxfp4", context_tokens=1024),
                 "mxfp4_cache": wb.plan(config, "mxfp4", context_tokens=1024, expert_cache=args.cache),
                 "bf16": wb.plan(config, "bf16", context_tokens=1024)}
        result["plan"] = {
            "packed_weights_bytes": plans["mxfp4"].load_bytes, "packed_overhead_bytes": plans["mxfp4"].overhead_bytes,
            "packed_need_bytes_1024_tokens": plans["mxfp4"].need_bytes,
            "packed_need_bytes_with_cache": plans["mxfp4_cache"].need_bytes,
            "transformers_dequantized_weights_bytes": plans["mxfp4"].dequantized_bytes,
            "bf16_preset_need_bytes": plans["bf16"].need_bytes, "bf16_fits_here": plans["bf16"].fits_target}
        log("plan (packed):\n" + str(plans["mxfp4"]))
        log("plan (transformers' own dequantized path = preset bf16):\n" + str(plans["bf16"]))

        if not (folder / "model.safetensors.index.json").is_file():
            log(f"writing the random checkpoint to {folder} (disk free: {format_bytes(shutil.disk_usage(folder.parent).free)})")
            start = time.perf_counter()
            write_random_mxfp4(config, folder, seed=0)
            result["write_seconds"] = round(time.perf_counter() - start, 1)
        result["checkpoint_bytes"] = folder_bytes(folder)
        log(f"checkpoint: {format_bytes(result['checkpoint_bytes'])}")

        before = rss()
        start = time.perf_counter()
        s = wb.load(str(folder), preset="mxfp4", context_tokens=1024)
        load_seconds = time.perf_counter() - start
        after = rss()
        log(f"loaded in {load_seconds:.1f} s; RSS {format_bytes(before)} -> {format_bytes(after)}\n{s.report}")
        result["load"] = {
            "seconds": round(load_seconds, 1), "rss_before_bytes": before, "rss_after_bytes": after,
            "report_measured_bytes": s.report.total_bytes, "report_planned_bytes": s.report.planned_bytes,
            "mxfp4_path": s.report.mxfp4_path, "actual_quantization": s.report.actual_quantization,
            "note": "transformers maps the safetensors files (zero-copy for the uint8 blocks): pages become "
                    "resident as the first forward reads them, so RSS is measured again after it"}

        g = torch.Generator().manual_seed(0)
        vocab = s.tokenizer.vocab_size if hasattr(s.tokenizer, "vocab_size") else 500
        ids = torch.randint(3, min(vocab, 500), (1, 1024), generator=g)
        def forward(n):  # a prefill as generate runs it: logits for the last position only
            with torch.no_grad():
                s.model(input_ids=ids[:, :n], use_cache=False, logits_to_keep=1)
        _, first = timed(lambda: forward(256))  # reads every expert once: the mapped pages become resident
        result["first_forward_256"] = {**rates(256, first), "note": "includes reading the weights' pages"}
        resident = rss()
        result["memory_after_first_forward"] = {
            "rss_bytes": resident, "plan_weights_bytes": plans["mxfp4"].load_bytes,
            "plan_need_bytes": plans["mxfp4"].need_bytes,
            "rss_over_plan_need": round(resident / plans["mxfp4"].need_bytes, 3),
            "goal": "<= 16 GB and within 10% of the plan"}
        log(f"first forward (256 tokens): {first}; RSS {format_bytes(resident)}")
        _, t = timed(lambda: forward(256))
        result["prefill_256"] = {**rates(256, t), "goal": ">= 10 tok/s", "logits": "last position (logits_to_keep=1)"}
        log(f"prefill 256 tokens: {result['prefill_256']}")

        result["decode_no_cache"] = {**decode(s.model, ids[:, :16], args.decode_tokens), "goal": ">= 2 tok/s"}
        log(f"decode without cache: {result['decode_no_cache']}")

        tr, t = timed(lambda: s.trace(ids[:, :256], what=["routing"]))
        result["routing_trace_256"] = {**t, "layers": len(tr.routing.layers), "indices_shape": list(tr.routing.indices.shape),
                                       "rss_bytes": rss(), "budget": "2GB (default)"}
        log(f"routing trace 256: {result['routing_trace_256']}")
        del tr
        tr, t = timed(lambda: s.trace(ids[:, :1024], what=["attention"]))
        pattern = tr.attention(-1, 0)
        result["attention_trace_1024"] = {**t, "layers": len(tr.attention_layers), "one_pattern_shape": list(pattern.shape),
                                          "rss_bytes": rss(), "budget": "2GB (default)"}
        del tr, pattern
        log(f"attention trace 1024: {result['attention_trace_1024']}")

        result["peak_rss_without_cache_bytes"] = peak_rss()  # everything above, before the expert cache fills
        log(f"peak RSS so far (no expert cache): {format_bytes(result['peak_rss_without_cache_bytes'])}")
        cache = mxfp4_packed.set_expert_cache(s.model, args.cache)
        result["decode_with_cache"] = decode(s.model, ids[:, :16], args.decode_tokens)
        result["decode_with_cache"].update(budget=args.cache, hits=cache.hits, misses=cache.misses,
                                           evictions=cache.evictions, cached_bytes=cache.bytes)
        log(f"decode with cache {args.cache}: {result['decode_with_cache']}")
        result["peak_rss_bytes"] = peak_rss()
        result["rss_end_bytes"] = rss()
        log(f"peak RSS {format_bytes(result['peak_rss_bytes'])}")
    except BaseException as e:  # keep what was measured, and say where it stopped
        result["stopped_by"] = repr(e)
        raise
    finally:
        if args.size == "20b":
            record("mxfp4_fullsize", result)
        if not args.keep and folder.exists():
            shutil.rmtree(folder)
            log(f"deleted {folder}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
