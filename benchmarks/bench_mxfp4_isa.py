"""The packed MXFP4 kernel built for each instruction set, against the plain-torch path: what a CPU without
AVX-512 (most laptops: AVX2) gets, measured on this machine by building the lower variants.

`WORKBENCH_MXFP4_KERNEL` picks the build: unset (this CPU, -march=native), `avx2` (-mno-avx512f), `generic`
(plain C++, no AVX2 or AVX-512 intrinsics) or `0` (no kernel: the plain-torch packed path). A process loads one
build, so each setting runs in a worker process of its own; the settings take turns, in a rotating order, round
by round. Each worker loads the same random full-width gpt-oss (gpt-oss-20b config, `--layers` layers, MXFP4
layout; benchmarks/random_gpt_oss.py), warms it, then times a prefill of `--prefill` ids (last position's logits)
and `--decode` greedy steps with the KV cache after a 16-token prompt (bench_mxfp4_kernel.py's functions).

Figures go to benchmarks/results.json under "mxfp4_isa". A lower variant built on an AVX-512 CPU runs that
CPU's memory system and clock, and torch's own GEMMs (attention, output matrix, prefill) still use AVX-512: the
ratios say what the kernel's instruction set costs, not how fast an AVX2 laptop is.

    python benchmarks/bench_mxfp4_isa.py --layers 4 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
SETTINGS = ("native", "avx2", "generic", "0")


def worker(folder: pathlib.Path, prefill_tokens: int, decode_steps: int) -> dict:
    import torch

    from bench_mxfp4_kernel import decode, prefill

    import workbench as wb

    s = wb.load(str(folder), preset="mxfp4", context_tokens=1024)
    ids = torch.randint(3, 500, (1, prefill_tokens), generator=torch.Generator().manual_seed(0))
    prefill(s.model, ids[:, :16])  # warm: maps the weights' pages, builds buffers
    decode(s.model, ids[:, :16], 2)
    p, d = prefill(s.model, ids), decode(s.model, ids[:, :16], decode_steps)
    return {"kernel": s.report.mxfp4_kernel, "threads": torch.get_num_threads(),
            "prefill_tokens_per_s": round(p["tokens_per_s"], 2), "decode_tokens_per_s": round(d["tokens_per_s"], 3),
            "load_average": d["load_average"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--beside", default="", help="what else ran on the machine meanwhile (recorded)")
    parser.add_argument("--folder", default="/tmp/workbench-gpt-oss-kernel-bench")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = pathlib.Path(f"{args.folder}-{args.layers}l")
    if args.worker:
        print("RESULT " + json.dumps(worker(folder, args.prefill, args.decode)), flush=True)
        return

    from random_gpt_oss import folder_bytes, gpt_oss_config, write_random_mxfp4
    from results_file import record

    from workbench.model import mxfp4_kernel

    result: dict = {"model": f"random full-width gpt-oss (gpt-oss-20b config) at {args.layers} layers, MXFP4 layout, seed 0",
                    "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(),
                                "avx512f": "avx512f" in mxfp4_kernel.cpu_flags(), "avx2": "avx2" in mxfp4_kernel.cpu_flags()},
                    "beside": args.beside or "nothing recorded", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "prefill_tokens": args.prefill, "decode_steps": args.decode, "rounds": {k: [] for k in SETTINGS}}
    try:
        layers = args.layers
        if not (folder / "model.safetensors.index.json").is_file():
            write_random_mxfp4(gpt_oss_config("20b", num_hidden_layers=layers), folder, seed=0)
        result["checkpoint_bytes"] = folder_bytes(folder)
        for r in range(args.rounds):
            order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]
            for setting in order:
                env = dict(os.environ)
                env.pop(mxfp4_kernel.ENV, None)
                if setting != "native":
                    env[mxfp4_kernel.ENV] = setting
                done = subprocess.run([sys.executable, __file__, "--worker", setting, "--layers", str(layers),
                                       "--prefill", str(args.prefill), "--decode", str(args.decode),
                                       "--folder", args.folder], env=env, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"worker {setting} failed: {done.stderr[-1500:]}")
                one = json.loads(lines[-1][len("RESULT "):])
                result["rounds"][setting].append(one)
                print(time.strftime("%H:%M:%S"), f"round {r} {setting}: {one}", flush=True)
        med = {k: {kind: statistics.median(x[f"{kind}_tokens_per_s"] for x in runs) for kind in ("prefill", "decode")}
               for k, runs in result["rounds"].items()}
        result["median_tokens_per_s"] = med
        result["kernel_by_setting"] = {k: runs[0]["kernel"] for k, runs in result["rounds"].items()}
        result["ratio_over_plain_torch"] = {k: {kind: round(med[k][kind] / med["0"][kind], 2) for kind in med[k]}
                                            for k in SETTINGS if k != "0"}
        result["ratio_over_native"] = {k: {kind: round(med[k][kind] / med["native"][kind], 2) for kind in med[k]}
                                       for k in ("avx2", "generic")}
        print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "ratio_over_plain_torch", "ratio_over_native")}))
    except BaseException as e:
        result["stopped_by"] = repr(e)
        raise
    finally:
        if not args.no_record:
            record("mxfp4_isa", result)
        if not args.keep and folder.exists():
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
