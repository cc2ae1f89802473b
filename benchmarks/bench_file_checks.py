"""What checking files before trusting them costs, against the load: weights (safetensors headers and sizes, NaN/inf in
every floating-point tensor: workbench/model/integrity.py) and traces (a CRC-32 of every tensor: Trace.save/load).

    python benchmarks/bench_file_checks.py --model /path/to/model/folder      # any model folder or hub id
    python benchmarks/bench_file_checks.py                                    # gpt-oss-nano (shipped)
    nohup python benchmarks/bench_file_checks.py --random-20b > /tmp/bench_checks.log 2>&1 &   # full size

In one process: the header check alone; a load with check_weights=False and its first forward; a load with the
checks (the report's figure) and its first forward; the NaN/inf scan again on the loaded model (warm); a trace
saved and loaded with and without its checksums. The first load reads the files into the page cache, so both loads
read from memory: the figures are CPU cost, not disk. transformers maps safetensors files: a load that keeps the
checkpoint's dtype can be nearly free and its pages read later, by the first forward, or by the scan for the
tensors it reads; so the load is also given with its first forward.

--random-20b writes the full-size random gpt-oss-20b in the MXFP4 layout (benchmarks/random_gpt_oss.py, ~13.8 GB;
deleted afterwards unless --keep) and measures it: run it on an idle machine with ~20 GB of memory. Figures go to
benchmarks/results.json under "file_checks", one entry per model.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py: spin-waiting skews a shared CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from results_file import RESULTS, record

import workbench as wb
from workbench.inspect import trace as trace_file
from workbench.model import integrity, sources


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def timed(fn) -> tuple[object, dict]:
    """(fn(), {wall seconds, CPU seconds of this process, load average}), as bench_mxfp4_fullsize.py times."""
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 4), "cpu_s": round(time.process_time() - cpu, 4),
                 "load_average": round((load + os.getloadavg()[0]) / 2, 1)}


def first_forward(s, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        return timed(lambda: s.model(input_ids=ids, use_cache=False, logits_to_keep=1))[1]


def rss() -> int:
    return psutil.Process().memory_info().rss


def weights(model: str, preset: str, tokens: int, repeat: int) -> tuple[dict, object]:
    """The weight checks against the load (medians of `repeat` loads each way, after one untimed warm-up load that
    pays the imports and fills the page cache); returns the figures and the last checked session (for the trace)."""
    source = sources.resolve(model)
    files, t = timed(lambda: integrity.weight_files(source))
    _, t_headers = timed(lambda: integrity.check_files(files, source))
    out: dict = {"files": len(files), "file_bytes": sum(f.stat().st_size for f in files),
                 "header_check": {**t_headers, "lookup_s": t["wall_s"]}, "repeat": repeat}
    ids = prompt(tokens)
    del wb.load(model, preset=preset, check_weights=False).model  # warm-up
    gc.collect()
    runs: dict[str, list] = {"unchecked": [], "checked": []}
    for i in range(repeat):
        for kind in ("unchecked", "checked") if i % 2 == 0 else ("checked", "unchecked"):  # alternate the order
            s = None  # each load starts with no other model alive
            gc.collect()
            s, t = timed(lambda: wb.load(model, preset=preset, check_weights=kind == "checked"))
            check = s.report.weights_check
            runs[kind].append({**t, "report_load_s": round(s.report.load_seconds, 4), "rss_bytes": rss(),
                               "first_forward_s": first_forward(s, ids)["wall_s"], "check_s": round(check.seconds, 4),
                               "check_cpu_s": round(check.cpu_seconds, 4)})
    if s.report.weights_check.skipped:  # the last load was unchecked: the figures below need a checked one
        s = None
        gc.collect()
        s = wb.load(model, preset=preset)
    check = s.report.weights_check
    for kind, rows in runs.items():
        out[f"load_{kind}"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        log(f"{kind} loads: {rows}")
    out["check"] = {"seconds": out["load_checked"]["check_s"], "cpu_seconds": out["load_checked"]["check_cpu_s"],
                    "files": check.files, "tensors": check.tensors,
                    "values": check.values, "not_scanned_integer_tensors": check.not_scanned,
                    "offloaded": check.offloaded, "report_line": check.describe(s.report.load_seconds)}
    log(f"checked load:\n{s.report}")
    _, out["scan_warm"] = timed(lambda: integrity.scan(s.model, {}, source, integrity.WeightCheck()))
    scanned = sum(p.numel() * p.element_size() for p in s.model.parameters() if p.is_floating_point())
    out["scan_warm"]["float_gb_per_s"] = round(scanned / out["scan_warm"]["wall_s"] / 1e9, 2)

    load = out["load_unchecked"]["wall_s"]
    with_forward = load + out["load_unchecked"]["first_forward_s"]
    out["share"] = {
        "check_over_load": round(out["check"]["seconds"] / load, 4),
        "check_cpu_over_load_cpu": round(out["check"]["cpu_seconds"] / out["load_unchecked"]["cpu_s"], 4),
        "check_over_load_and_first_forward": round(out["check"]["seconds"] / with_forward, 4),
        "checked_over_unchecked_load": round(out["load_checked"]["wall_s"] / load, 4),
        "note": "load = wb.load(check_weights=False), wall; check = the report's figure (headers + scan, "
                "including any page reads the scan does first); medians"}
    return out, s


def prompt(tokens: int) -> torch.Tensor:
    return torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(0))


def traces(s, tokens: int) -> dict:
    """Trace save/load with checksums against the same file without (as written before checksums)."""
    what = ["attention", "residuals"] + (["routing"] if s.adapter.is_moe else [])
    t = s.trace(prompt(tokens), what=what)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "t.wbtrace"
        _, save = timed(lambda: t.save(path))
        _, load = timed(lambda: wb.Trace.load(path))
        tensors = {**t._t, "tokens.ids": torch.tensor(t.tokens.ids)}
        _, crc = timed(lambda: [trace_file._crc32(v) for v in tensors.values()])
        return {"tokens": tokens, "what": what, "file_bytes": path.stat().st_size, "tensors": len(tensors),
                "save": save, "load": load, "crc32_all_tensors": crc,
                "crc32_over_load": round(crc["wall_s"] / max(load["wall_s"], 1e-9), 3),
                "note": "save computes the CRC-32 of every tensor once and load once more: crc32_all_tensors is the "
                        "cost of one of them, inside the save and load times"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a model folder or hub id (default: gpt-oss-nano, bf16)")
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the first forward and of the trace")
    parser.add_argument("--repeat", type=int, default=3, help="loads each way (medians are recorded)")
    parser.add_argument("--random-20b", action="store_true", help="write and measure the full-size random gpt-oss-20b")
    parser.add_argument("--folder", default="/tmp/workbench-gpt-oss-20b-random")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint afterwards")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/results.json")
    args = parser.parse_args()

    folder = pathlib.Path(args.folder)
    written = False
    if args.random_20b:
        from random_gpt_oss import gpt_oss_config, write_random_mxfp4

        if not (folder / "model.safetensors.index.json").is_file():
            log(f"writing the random gpt-oss-20b to {folder}")
            write_random_mxfp4(gpt_oss_config("20b"), folder, seed=0)
            written = True
        model, label = str(folder), "random gpt-oss-20b (MXFP4 layout, seed 0)"
    else:
        model = args.model or str(wb.fixtures.nano_path())
        label = pathlib.Path(model).name if args.model else "gpt-oss-nano (bf16)"
    result: dict = {"model": label, "preset": args.preset, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                "ram_bytes": psutil.virtual_memory().total, "torch": torch.__version__,
                                "transformers": transformers.__version__, "processor": platform.machine()}}
    try:
        result["weights"], s = weights(model, args.preset, args.tokens, args.repeat)
        result["trace"] = traces(s, args.tokens)
        log(json.dumps(result["trace"]))
    except BaseException as e:  # keep what was measured, and say where it stopped
        result["stopped_by"] = repr(e)
        raise
    finally:
        if not args.no_record:
            data = json.loads(RESULTS.read_text()).get("file_checks", {}) if RESULTS.exists() else {}
            data[label] = result
            record("file_checks", data)
        if args.random_20b and written and not args.keep and folder.exists():
            shutil.rmtree(folder)
            log(f"deleted {folder}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
