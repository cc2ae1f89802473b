"""One command for a GPU machine: gpt-oss-20b (random weights, written locally) under bf16, packed mxfp4 and native
mxfp4: footprint vs plan, decode speed of plain generate vs s.chat vs the widget, capture overhead, agreement.

    python benchmarks/gpu_suite.py --json OUT.json   # full size on the first CUDA GPU, inside a 330 s budget
    python benchmarks/gpu_suite.py --tiny          # the same code at tiny size on the CPU (the tests run this)
    python benchmarks/gpu_suite.py --record OUT.json # store a run's figures in benchmarks/results.json, "gpu_suite"

On a machine without internet (the GPU machine this project borrows): `bash scripts/gpu_wheels.sh` here downloads
the packages it lacks as wheels and prints the command that installs them there and runs this (README, "GPU suite").

What it does, in order (each part says why when it is skipped, e.g. "not enough memory: needs ..." or "over the time
budget: needs ~90 s, 40 s left"):
0. checks, in a second: versions, where transformers comes from, native mxfp4 (`kernels`), the widget's imports
   (ipywidgets and plotly; without them only the widget's figure is skipped), free disk for the checkpoint;
1. writes a random gpt-oss-20b in the real MXFP4 layout to --workdir (~13.8 GB; benchmarks/random_gpt_oss.py; by
   default a new folder in the temporary folder, else in the checkout, whichever has room);
2. per variant, if its plan fits the free memory of the device and the budget has room: "mxfp4 packed" (the
   workbench's packed path, preset "mxfp4" without native kernels), "bf16" (transformers dequantizes every expert,
   preset "bf16") and "mxfp4 native" (transformers' triton kernels: only where
   `hardware.mxfp4_unavailable_reason()` is None, which also needs the `kernels` package and its hub download):
   load time, bytes measured by the report and the device's allocated memory after load, against the plan;
3. on each loaded variant: decode tokens/s of plain `model.generate` (greedy, fixed length), `s.chat` and the
   widget (`s.widget().generate`, `wait`) on the same prompt; forward time of a plain forward vs a routing trace
   vs an attention trace (ratios);
4. agreement of mxfp4 packed with bf16 on the same tokens: max |logit difference|, top-1 agreement, routing
   identical or not (the first one's logits and routing are kept on the CPU between the two loads);
5. deletes the checkpoint (unless --keep).

Sized to the GPU machine's lease (15 minutes of device time in all, one command at most 10): every part prints what
it cost and the time so far, and the results are written after every part (a run stopped at its limit, or by
SIGTERM, still leaves its figures, marked "interrupted"). --budget (default 330 s at full size, none with --tiny)
skips, with the reason, any part that would not fit in what is left, estimated from the parts already measured,
so a full run and a second one fit in the lease. Expected on one H200, not measured yet (no GPU has run it):
writing ~1-1.5 min (CPU random numbers), each load ~0.5-1 min, each variant's measurements ~1 min at 64 decode
tokens and 1,024 traced tokens: about 4-5 minutes. `--tiny` takes ~20-60 s on two CPU cores.
--pretend-free BYTES replaces the measured free memory (to test the skip path, or to plan a smaller machine).
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py: spinning OpenMP threads skew CPU timings

import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from random_gpt_oss import checkpoint_tensors, gpt_oss_config, write_random_mxfp4

import workbench as wb
from workbench.inspect.routing import routed_forward
from workbench.model import hardware
from workbench.sizes import format_bytes, parse_bytes

# The workbench's own path first: if the budget runs short, the headline figures are measured already.
VARIANTS = {"mxfp4 packed": "mxfp4", "bf16": "bf16", "mxfp4 native": "mxfp4"}
PROMPT = "Explain in one paragraph why the sky is blue."
FULL_BUDGET_S = 330.0  # one full run inside a 10-minute device command, with room for a second run in the lease
FIRST_VARIANT_GUESS_S = 90.0  # a full-size load + measurements before any variant was measured (a guess; H200)


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def allocated(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


def free_bytes(device: str, pretend: int | None) -> int:
    if pretend is not None:
        return pretend
    return next(d.free_bytes for d in hardware.devices() if d.name == device)


def release(device: str) -> None:
    """Give a finished variant's memory back before the next one loads."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class Suite:
    """The run's results, its time budget, and where the results go after every part."""

    def __init__(self, result: dict, budget_s: float | None, json_path: str | None, record: bool):
        self.result, self.budget_s, self.json_path, self.record = result, budget_s, json_path, record
        self.start = time.perf_counter()
        result.setdefault("costs_seconds", {})
        result["budget_seconds"] = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def short_of(self, need_s: float) -> str | None:
        """Why a part that needs about `need_s` seconds does not fit in what is left of the budget; None if it does."""
        if self.left() >= need_s:
            return None
        return (f"over the time budget: needs ~{need_s:.0f} s, {max(self.left(), 0):.0f} s left of "
                f"--budget {self.budget_s:.0f}")

    def part(self, name: str, fn):
        """Run one part; print what it cost and the time so far; write the results (even if it raised)."""
        start = time.perf_counter()
        try:
            return fn()
        finally:
            cost = time.perf_counter() - start
            self.result["costs_seconds"][name] = round(cost, 2)
            left = "" if self.budget_s is None else f", {self.left():.0f} s of the budget left"
            log(f"[{name}: {cost:.1f} s; {self.elapsed():.0f} s so far{left}]")
            self.save()

    def save(self) -> str:
        self.result["elapsed_seconds"] = round(self.elapsed(), 1)
        text = json.dumps(shaped(self.result), indent=2)
        if self.json_path:
            path = pathlib.Path(self.json_path)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)
        elif self.record:
            from results_file import record

            record("gpu_suite", json.loads(text))
        return text


def shaped(result: dict) -> dict:
    """The results as written: headline decode and capture figures from the best mxfp4 path that ran (else bf16)."""
    out = dict(result)
    decode, capture = result["decode_tokens_per_s"], result["capture_overhead"]
    main = next((v for v in ("mxfp4 native", "mxfp4 packed", "bf16") if v in decode), None)
    if main:
        out["decode_tokens_per_s"] = {**decode[main], "variant": main, "per_variant": decode}
    if main in capture:
        out["capture_overhead"] = {**capture[main], "variant": main, "per_variant": capture}
    return out


def stop_on_sigterm() -> None:
    """`timeout` and a lease's end send SIGTERM: turn it into KeyboardInterrupt so the results are written."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def widget_unavailable_reason() -> str | None:
    """Why the widget cannot be built here (its imports), or None. Only the widget's figure needs them."""
    try:
        import workbench.ui.widget  # noqa: F401  (ipywidgets, traitlets, IPython, plotly)
    except ImportError as e:
        return (f"the widget's imports fail here ({type(e).__name__}: {e}); it needs ipywidgets and plotly "
                "(scripts/gpu_wheels.sh carries them to a machine without internet)")
    return None


def environment(device: str) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"device": torch.cuda.get_device_name(0) if device != "cpu" else platform.processor() or "cpu",
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "transformers_from": str(pathlib.Path(transformers.__file__).parent),
            **{name: version(name) for name in ("accelerate", "huggingface-hub", "tokenizers", "safetensors", "triton",
                                                "kernels", "ipywidgets", "plotly")}}


def choose_workdir(given: str | None, need: int) -> pathlib.Path:
    """--workdir, else a new folder in the first of the temporary folder, the checkout, the current folder with room."""
    if given:
        return pathlib.Path(given)
    bases = [tempfile.gettempdir(), str(ROOT), os.getcwd()]
    base = next((b for b in bases if shutil.disk_usage(b).free >= need * 1.05), bases[0])
    return pathlib.Path(tempfile.mkdtemp(prefix="workbench-gpu-suite-", dir=base))


def skip_reason(variant: str, folder: pathlib.Path, device: str, pretend: int | None, context: int) -> str | None:
    if variant == "mxfp4 native":
        why = hardware.mxfp4_unavailable_reason()
        if why:
            return f"native mxfp4 kernels unavailable here: {why}"
    plan = wb.plan(str(folder), VARIANTS[variant], context_tokens=context)
    free = free_bytes(device, pretend)
    if plan.need_bytes > free:
        return f"not enough memory: needs {format_bytes(plan.need_bytes)} on {device}, {format_bytes(free)} free"
    return None


class path_for:
    """Where native kernels work, "mxfp4 packed" is measured by setting them aside (preset 'mxfp4' would take them)."""

    def __init__(self, variant: str):
        self.variant, self.original = variant, hardware.mxfp4_unavailable_reason

    def __enter__(self):
        if self.variant == "mxfp4 packed" and self.original() is None:
            hardware.mxfp4_unavailable_reason = lambda: "native kernels set aside by gpu_suite to measure the packed path"

    def __exit__(self, *exc):
        hardware.mxfp4_unavailable_reason = self.original


def decode_speeds(suite: Suite, variant: str, s, device: str, tokens: int, widget_why: str | None) -> None:
    """tokens/s after the first token, greedy, `tokens` new tokens: plain generate vs s.chat vs the widget."""
    out = suite.result["decode_tokens_per_s"].setdefault(variant, {"new_tokens": tokens})
    prompt = torch.tensor([s.render(PROMPT)], device=device)

    def generate(n):
        with torch.no_grad():
            s.model.generate(prompt, do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)

    def plain():
        generate(2)  # warm-up
        first, whole = timed(lambda: generate(1), device), timed(lambda: generate(tokens), device)
        out["generate"] = round((tokens - 1) / max(whole - first, 1e-9), 2)
        return whole
    whole = suite.part(f"{variant}: decode, plain generate", plain)

    def chat():
        out["chat"] = round(s.chat(PROMPT, temperature=0, max_new_tokens=tokens, stop_tokens=[]).tokens_per_second, 2)

    def widget():
        w = s.widget(temperature=0.0, max_new_tokens=tokens)
        try:
            assert w.generate(PROMPT), w.error
            shown = w.wait(timeout=max(60.0, min(600.0, suite.left())))
        finally:
            w.close()
        out["widget"], out["widget_tokens"] = round(shown.tokens_per_second, 2), len(shown.token_ids)

    for name, fn, unavailable in (("chat", chat, None), ("widget", widget, widget_why)):
        why = unavailable or suite.short_of(1.5 * whole + 5)
        if why:
            out[name], out[f"{name}_skipped"] = None, why
            log(f"{variant}: {name} decode skipped: {why}")
            continue
        suite.part(f"{variant}: decode, {name}", fn)
    log(f"{variant}: decode tokens/s {out}")


def capture_overhead(suite: Suite, variant: str, s, device: str, ids: torch.Tensor) -> None:
    out = suite.result["capture_overhead"].setdefault(variant, {"tokens": ids.shape[1]})

    def plain():
        with torch.no_grad():
            s.model(input_ids=ids.to(device), use_cache=False)

    def base():
        plain()  # warm-up
        out["plain_seconds"] = round(min(timed(plain, device) for _ in range(2)), 4)
        return out["plain_seconds"]
    seconds = suite.part(f"{variant}: capture, plain forward", base)
    for what in ("routing", "attention"):
        why = suite.short_of(3 * seconds + 5)
        if why:
            out[what], out[f"{what}_skipped"] = None, why
            log(f"{variant}: {what} capture skipped: {why}")
            continue

        def traced(what=what):
            best = min(timed(lambda: s.trace(ids[0].tolist(), what=[what]), device) for _ in range(2))
            out[what] = round(best / seconds, 3)
        suite.part(f"{variant}: capture, {what} trace", traced)
    log(f"{variant}: capture overhead {out}")


def logits_and_routing(s, ids: torch.Tensor, device: str):
    out, routed = routed_forward(s.model, s.adapter, input_ids=ids.to(device))
    return out.logits[0].float().cpu(), {layer: r.indices.cpu() for layer, r in routed.items()}


def run_variant(suite: Suite, variant: str, preset: str, folder: pathlib.Path, device: str, ids: torch.Tensor,
                decode_tokens: int, widget_why: str | None):
    """Load one variant, record its footprint, decode speeds and capture overhead; its logits and routing (or None)."""
    result = suite.result
    release(device)
    before = allocated(device)

    def load():
        start = time.perf_counter()
        s = wb.load(str(folder), preset=preset, context_tokens=ids.shape[1])
        return s, time.perf_counter() - start
    s, seconds = suite.part(f"{variant}: load", load)
    after = allocated(device)
    result["footprint"][variant] = {
        "path": s.report.mxfp4_path, "load_seconds": round(seconds, 1),
        "measured_weight_bytes": s.report.total_bytes, "planned_weight_bytes": s.report.planned_bytes,
        "planned_need_bytes": s.plan.need_bytes, "device_allocated_bytes": None if after is None else after - before}
    log(f"{variant}: loaded in {seconds:.1f} s, {format_bytes(s.report.total_bytes)} "
        f"(plan {format_bytes(s.report.planned_bytes)}), path: {s.report.mxfp4_path}")
    suite.save()
    decode_speeds(suite, variant, s, device, decode_tokens, widget_why)
    capture_overhead(suite, variant, s, device, ids)
    plain = result["capture_overhead"][variant].get("plain_seconds") or 0.0
    why = suite.short_of(2 * plain + 2)
    if why:
        log(f"{variant}: logits for the agreement skipped: {why}")
        result["agreement"].setdefault("skipped", f"{variant}'s logits: {why}")
        return None
    return suite.part(f"{variant}: logits and routing", lambda: logits_and_routing(s, ids, device))


def agreement(ids_tokens: int, reference, logits, routing) -> dict:
    ref_logits, ref_routing = reference
    same = [bool(torch.equal(routing[layer], ref_routing[layer])) for layer in ref_routing]
    return {"logits_max_abs_diff": float((logits - ref_logits).abs().max()),
            "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "routing_identical": all(same), "layers_with_identical_routing": sum(same),
            "layers": len(same), "tokens": ids_tokens}


def record_file(path: str) -> None:
    """Store a run's JSON (e.g. fetched back from the GPU machine) in benchmarks/results.json under "gpu_suite"."""
    from results_file import record

    result = json.loads(pathlib.Path(path).read_text())
    if result.get("size") != "20b" or not str(result.get("device", "")).startswith("cuda"):
        sys.exit(f"{path} is not a full-size GPU run (size {result.get('size')!r}, device {result.get('device')!r})")
    print(f"recorded {path} in {record('gpu_suite', result)} (key gpu_suite)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random gpt-oss on the CPU (what the tests run)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (deleted after)")
    parser.add_argument("--json", default=None, help="write the results here, after every part "
                        "(default at full size: benchmarks/results.json, key gpu_suite)")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--trace-tokens", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run; parts that would not fit are skipped with the reason "
                             f"(default {FULL_BUDGET_S:.0f} at full size, none with --tiny; 0 = none)")
    parser.add_argument("--pretend-free", default=None, help="use this free memory instead of the measured one")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--record", metavar="JSON", default=None,
                        help="only store this run's JSON in benchmarks/results.json (key gpu_suite) and stop")
    args = parser.parse_args()
    if args.record:
        return record_file(args.record)
    stop_on_sigterm()
    device = "cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu"
    size = "tiny" if args.tiny else "20b"
    decode_tokens = args.decode_tokens or (32 if args.tiny else 64)
    trace_tokens = args.trace_tokens or (64 if args.tiny else 1024)
    budget = args.budget if args.budget is not None else (None if args.tiny else FULL_BUDGET_S)
    pretend = parse_bytes(args.pretend_free, what="--pretend-free") if args.pretend_free else None
    workdir = folder = None
    result: dict = {"size": size, "device": device, "footprint": {}, "decode_tokens_per_s": {},
                    "capture_overhead": {}, "agreement": {}, "machine": environment(device),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    suite = Suite(result, budget or None, args.json, record=not args.tiny)
    if device == "cpu" and not args.tiny:
        log("no CUDA GPU: the full-size suite is meant for a GPU (use --tiny here); running it on the CPU anyway")
    log(f"gpu suite, size {size}, on {device}: {json.dumps(result['machine'])}")
    try:
        config = gpt_oss_config(size)

        def checks():
            nonlocal workdir, folder
            native = hardware.mxfp4_unavailable_reason()
            log(f"native mxfp4: {'available' if native is None else native}")
            widget_why = widget_unavailable_reason()
            log(f"widget: {'importable' if widget_why is None else widget_why}")
            need = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in checkpoint_tensors(config))
            workdir = choose_workdir(args.workdir, need)
            folder = workdir / f"gpt-oss-{size}-random-mxfp4"
            workdir.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(workdir).free
            log(f"checkpoint {format_bytes(need)} to {workdir} ({format_bytes(disk)} free)")
            if not (folder / "model.safetensors.index.json").is_file() and disk < need * 1.05:
                raise SystemExit(f"not enough disk in {workdir}: the checkpoint needs {format_bytes(need)}, "
                                 f"{format_bytes(disk)} free (--workdir elsewhere)")
            return widget_why
        widget_why = suite.part("checks", checks)
        if not (folder / "model.safetensors.index.json").is_file():
            seconds = suite.part("write checkpoint", lambda: timed(lambda: write_random_mxfp4(config, folder, seed=0),
                                                                   "cpu"))
            result["write_seconds"] = round(seconds, 1)
            log(f"wrote {folder} in {seconds:.1f} s")
        ids = torch.randint(3, 500, (1, trace_tokens), generator=torch.Generator().manual_seed(0))
        measured_logits, variant_s = {}, FIRST_VARIANT_GUESS_S if size == "20b" else 0.0
        for variant, preset in VARIANTS.items():
            with path_for(variant):
                why = skip_reason(variant, folder, device, pretend, trace_tokens) or suite.short_of(variant_s)
            if why:
                log(f"skipping {variant}: {why}")
                result["footprint"][variant] = {"skipped": why}
                suite.save()
                continue
            start = time.perf_counter()
            try:
                with path_for(variant):
                    measured = run_variant(suite, variant, preset, folder, device, ids, decode_tokens, widget_why)
            except Exception as e:  # e.g. native kernels that need a hub download on an offline machine
                log(f"{variant} failed: {e!r}\n{traceback.format_exc()}")
                result.setdefault("failures", {})[variant] = repr(e)
                result["footprint"].setdefault(variant, {"failed": repr(e)})
                suite.save()
                continue
            finally:
                release(device)
            variant_s = max(variant_s, time.perf_counter() - start)  # the next variant's estimate: the longest yet
            if measured is not None and variant in ("bf16", "mxfp4 packed"):
                measured_logits[variant] = measured
            if len(measured_logits) == 2:
                result["agreement"] = agreement(trace_tokens, measured_logits.pop("bf16"),
                                                *measured_logits.pop("mxfp4 packed"))
                log(f"packed vs bf16: {result['agreement']}")
            del measured
        if not {"logits_max_abs_diff", "skipped"} & set(result["agreement"]):
            result["agreement"]["skipped"] = "needs both bf16 and mxfp4 packed measured"
        result["total_seconds"] = round(suite.elapsed(), 1)
    except KeyboardInterrupt as e:
        result["interrupted"] = f"stopped ({e or 'KeyboardInterrupt'}) after {suite.elapsed():.0f} s: what is here was measured"
        log(result["interrupted"])
        raise SystemExit(130)
    finally:
        if folder is not None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        text = suite.save()
    print(text)


if __name__ == "__main__":
    main()
