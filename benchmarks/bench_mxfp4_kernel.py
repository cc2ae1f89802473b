"""The packed MXFP4 path's C++ kernel against its plain-torch path: prefill and decode on a full-width gpt-oss.

Writes a random gpt-oss at full width (hidden 2880, 32 experts top-4, vocab 201,088: the bundled gpt-oss-20b config)
with only `--layers` layers (benchmarks/random_gpt_oss.py), loads it once with preset "mxfp4" and times, round by
round, the same model with the kernel on and off (`WORKBENCH_MXFP4_KERNEL`, read at every forward), interleaved so
that a change in the machine's load hits both alike:

- prefill: one forward over `--prefill` token ids (logits for the last position, no KV cache);
- decode: `--decode` greedy single-token steps with the KV cache after a 16-token prompt;
- one layer's experts alone (1 token and `--prefill` tokens, random top-4 routing), in CPU ms: the part the
  kernel replaces, without the output matrix and attention that every decode step also pays;
- `--crossover`: the few-row kernel against dequantize-once + GEMM for 1..32 rows of one gate_up expert, which
  sets mxfp4_kernel.DIRECT_MAX_ROWS.

Figures (tokens/s per round, medians, kernel/plain ratios, CPU seconds and load average) go to
benchmarks/results.json under "mxfp4_kernel". Pass `--beside "..."` to record what else was running.

    python benchmarks/bench_mxfp4_kernel.py --layers 4 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from random_gpt_oss import folder_bytes, gpt_oss_config, write_random_mxfp4
from results_file import record

import workbench as wb
from workbench.model import mxfp4_kernel, mxfp4_packed


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def timed(fn) -> dict:
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "load_average": round((load + os.getloadavg()[0]) / 2, 1)}


def prefill(model, ids) -> dict:
    with torch.no_grad():
        t = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))
    return {**t, "tokens_per_s": ids.shape[1] / t["wall_s"]}


def decode(model, prompt, steps: int) -> dict:
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        state = {"past": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

        def run():
            for _ in range(steps):
                o = model(input_ids=state["token"], past_key_values=state["past"], use_cache=True)
                state["past"], state["token"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
        t = timed(run)
    return {**t, "tokens_per_s": steps / t["wall_s"]}


def experts_only(model, tokens: int, repeats: int = 3) -> float:
    """CPU ms of one layer's experts (top-4 of 32, random routing) for `tokens` tokens: the part the kernel replaces."""
    experts = mxfp4_packed.packed_experts(model)[0]
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, experts.hidden_size, generator=g).bfloat16()
    indices = torch.stack([torch.randperm(experts.num_experts, generator=g)[:4] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 4, generator=g), -1).bfloat16()
    with torch.no_grad():
        experts(hidden, indices, weights)
        return min(timed(lambda: experts(hidden, indices, weights))["cpu_s"] for _ in range(repeats)) * 1e3


def crossover(repeats: int = 3) -> dict:
    """CPU ms for one gpt-oss-20b gate_up expert ([5760, 2880]) times n rows: the direct kernel vs dequantize + GEMM."""
    ops = mxfp4_kernel.kernel()
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (1, 5760, 90, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(119, 121, (1, 5760, 90), dtype=torch.uint8, generator=g)
    out = {}
    for n in (1, 2, 4, 8, 12, 16, 24, 32):
        x = torch.randn(n, 2880, generator=g).bfloat16()

        def best(fn):  # CPU seconds of this process (both threads): steadier than wall time on a shared machine
            fn()
            return min(timed(fn)["cpu_s"] for _ in range(repeats)) * 1e3
        direct = best(lambda: ops.grouped_matvec(x.float(), blocks, scales, mxfp4_kernel.lut(), [n], 10**6))
        saved = mxfp4_kernel.DIRECT_MAX_ROWS
        mxfp4_kernel.DIRECT_MAX_ROWS = 0  # grouped_mm's dequantize + GEMM branch for every n
        try:
            gemm = best(lambda: mxfp4_kernel.grouped_mm(ops, x, blocks, scales, [n]))
        finally:
            mxfp4_kernel.DIRECT_MAX_ROWS = saved
        out[n] = {"direct_ms": round(direct, 2), "dequantize_gemm_ms": round(gemm, 2)}
        log(f"crossover {n} rows: {out[n]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--beside", default="", help="what else ran on the machine meanwhile (recorded)")
    parser.add_argument("--folder", default="/tmp/workbench-gpt-oss-kernel-bench")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    folder = pathlib.Path(f"{args.folder}-{args.layers}l")
    result: dict = {"model": f"random full-width gpt-oss (gpt-oss-20b config) at {args.layers} layers, MXFP4 layout, seed 0",
                    "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "torch": torch.__version__, "processor": platform.machine(),
                                "bf16_gemm": mxfp4_kernel.bf16_gemm()},
                    "beside": args.beside or "nothing recorded", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "prefill_tokens": args.prefill, "decode_steps": args.decode, "direct_max_rows": mxfp4_kernel.DIRECT_MAX_ROWS}
    try:
        layers = args.layers
        config = gpt_oss_config("20b", num_hidden_layers=layers)
        if not (folder / "model.safetensors.index.json").is_file():
            log(f"writing {folder}")
            write_random_mxfp4(config, folder, seed=0)
        result["checkpoint_bytes"] = folder_bytes(folder)
        s = wb.load(str(folder), preset="mxfp4", context_tokens=1024)
        result["kernel"] = s.report.mxfp4_kernel
        log(f"loaded: {s.report.mxfp4_kernel}")
        if "C++ kernel" not in s.report.mxfp4_kernel:
            raise SystemExit(f"the kernel does not run here: {s.report.mxfp4_kernel}")
        ids = torch.randint(3, 500, (1, args.prefill), generator=torch.Generator().manual_seed(0))
        prefill(s.model, ids[:, :16])  # warm: maps the weights' pages, builds buffers
        rounds = {"kernel": [], "plain": []}
        for r in range(args.rounds):
            for path in (("kernel", "plain") if r % 2 == 0 else ("plain", "kernel")):
                os.environ[mxfp4_kernel.ENV] = "1" if path == "kernel" else "0"
                one = {"prefill": prefill(s.model, ids), "decode": decode(s.model, ids[:, :16], args.decode),
                       "experts_cpu_ms": {n: round(experts_only(s.model, n), 2) for n in (1, args.prefill)}}
                rounds[path].append(one)
                log(f"round {r} {path}: prefill {one['prefill']['tokens_per_s']:.2f} tok/s "
                    f"({one['prefill']['cpu_s']:.2f} CPU s), decode {one['decode']['tokens_per_s']:.2f} tok/s "
                    f"({one['decode']['cpu_s']:.2f} CPU s; load {one['decode']['load_average']}); "
                    f"one layer's experts, CPU ms by tokens: {one['experts_cpu_ms']}")
        os.environ.pop(mxfp4_kernel.ENV, None)
        for path, runs in rounds.items():
            result[path] = {
                kind: {"tokens_per_s": [round(x[kind]["tokens_per_s"], 3) for x in runs],
                       "median_tokens_per_s": round(statistics.median(x[kind]["tokens_per_s"] for x in runs), 3),
                       "cpu_s": [round(x[kind]["cpu_s"], 2) for x in runs],
                       # tokens per CPU second of this process: steadier than wall time on a shared machine
                       "median_tokens_per_cpu_s": round(statistics.median(
                           (args.prefill if kind == "prefill" else args.decode) / x[kind]["cpu_s"] for x in runs), 3),
                       "load_average": [x[kind]["load_average"] for x in runs]}
                for kind in ("prefill", "decode")}
        result["experts_one_layer_cpu_ms"] = {  # median over rounds, {tokens: ms}
            path: {n: statistics.median(x["experts_cpu_ms"][n] for x in runs) for n in (1, args.prefill)}
            for path, runs in rounds.items()}
        result["ratio_kernel_over_plain"] = {
            kind: round(result["kernel"][kind]["median_tokens_per_s"] / result["plain"][kind]["median_tokens_per_s"], 2)
            for kind in ("prefill", "decode")}
        result["ratio_kernel_over_plain_cpu_time"] = {
            kind: round(result["kernel"][kind]["median_tokens_per_cpu_s"] / result["plain"][kind]["median_tokens_per_cpu_s"], 2)
            for kind in ("prefill", "decode")}
        log(f"kernel / plain: {result['ratio_kernel_over_plain']} (wall), "
            f"{result['ratio_kernel_over_plain_cpu_time']} (CPU time)")
        if args.crossover:
            result["crossover_gate_up_expert"] = crossover()
        del s
    except BaseException as e:
        result["stopped_by"] = repr(e)
        raise
    finally:
        if not args.no_record:
            record("mxfp4_kernel", result)
        if not args.keep and folder.exists():
            shutil.rmtree(folder)
    print(result)


if __name__ == "__main__":
    main()
