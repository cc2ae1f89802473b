"""One command for a GPU machine: gpt-oss-20b (random weights, written locally) under bf16, packed mxfp4 and native
mxfp4: footprint vs plan, decode speed of plain generate vs s.chat vs the widget, capture overhead, agreement.

    python benchmarks/gpu_suite.py                 # full size, on the first CUDA GPU; results.json "gpu_suite"
    python benchmarks/gpu_suite.py --tiny          # the same code at tiny size on the CPU (the tests run this)

What it does, in order (each part says why when it is skipped, e.g. "not enough memory: needs ... free"):
1. writes a random gpt-oss-20b in the real MXFP4 layout to --workdir (~13.8 GB; benchmarks/random_gpt_oss.py);
2. per variant, if its plan fits the free memory of the device: "bf16" (transformers dequantizes every expert,
   preset "bf16"), "mxfp4 packed" (the workbench's packed path, preset "mxfp4" without native kernels) and
   "mxfp4 native" (transformers' triton kernels: only where `hardware.mxfp4_unavailable_reason()` is None, which
   also needs the kernel from the hub): load time, bytes measured by the report and the device's allocated
   memory after load, against the plan;
3. on each loaded variant: decode tokens/s of plain `model.generate` (greedy, fixed length), `s.chat` and the
   widget (`s.widget().generate`, `wait`) on the same prompt; forward time of a plain forward vs a routing trace
   vs an attention trace (ratios);
4. agreement of mxfp4 packed with bf16 on the same tokens: max |logit difference|, top-1 agreement, routing
   identical or not (the bf16 logits and routing are kept on the CPU between the two loads);
5. deletes the checkpoint (unless --keep).

Expected runtime on one H200 (141 GB), not measured yet (no GPU has run it): writing ~1-2 min on 16 cores,
each load ~0.5-1 min, each variant's measurements ~1 min at 64 decode tokens and 1,024 traced tokens: about
5-7 minutes in all, inside the 8-minute target. `--tiny` takes ~20-60 s on two CPU cores.
--pretend-free BYTES replaces the measured free memory (to test the skip path, or to plan a smaller machine).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generation.py: spinning OpenMP threads skew CPU timings

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from random_gpt_oss import gpt_oss_config, write_random_mxfp4

import workbench as wb
from workbench.inspect.routing import routed_forward
from workbench.model import hardware
from workbench.sizes import format_bytes, parse_bytes

VARIANTS = {"bf16": "bf16", "mxfp4 packed": "mxfp4", "mxfp4 native": "mxfp4"}
PROMPT = "Explain in one paragraph why the sky is blue."


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


@contextlib.contextmanager
def path_for(variant: str):
    """Where native kernels work, "mxfp4 packed" is measured by setting them aside (preset 'mxfp4' would take them)."""
    original = hardware.mxfp4_unavailable_reason
    if variant == "mxfp4 packed" and original() is None:
        hardware.mxfp4_unavailable_reason = lambda: "native kernels set aside by gpu_suite to measure the packed path"
    try:
        yield
    finally:
        hardware.mxfp4_unavailable_reason = original


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


def decode_speeds(s, device: str, tokens: int) -> dict:
    """tokens/s after the first token, greedy, `tokens` new tokens: plain generate vs s.chat vs the widget."""
    prompt = torch.tensor([s.render(PROMPT)], device=device)
    def generate(n):
        with torch.no_grad():
            s.model.generate(prompt, do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
    generate(2)  # warm-up
    first, whole = timed(lambda: generate(1), device), timed(lambda: generate(tokens), device)
    chat = s.chat(PROMPT, temperature=0, max_new_tokens=tokens, stop_tokens=[])
    w = s.widget(temperature=0.0, max_new_tokens=tokens)
    try:
        assert w.generate(PROMPT), w.error
        shown = w.wait(timeout=600)
    finally:
        w.close()
    return {"generate": round((tokens - 1) / max(whole - first, 1e-9), 2), "chat": round(chat.tokens_per_second, 2),
            "widget": round(shown.tokens_per_second, 2), "new_tokens": tokens,
            "widget_tokens": len(shown.token_ids)}


def capture_overhead(s, device: str, ids: torch.Tensor) -> dict:
    def plain():
        with torch.no_grad():
            s.model(input_ids=ids.to(device), use_cache=False)
    plain()  # warm-up
    base = min(timed(plain, device) for _ in range(2))
    routing = min(timed(lambda: s.trace(ids[0].tolist(), what=["routing"]), device) for _ in range(2))
    attention = min(timed(lambda: s.trace(ids[0].tolist(), what=["attention"]), device) for _ in range(2))
    return {"tokens": ids.shape[1], "plain_seconds": round(base, 4), "routing": round(routing / base, 3),
            "attention": round(attention / base, 3)}


def logits_and_routing(s, ids: torch.Tensor, device: str):
    out, routed = routed_forward(s.model, s.adapter, input_ids=ids.to(device))
    return out.logits[0].float().cpu(), {layer: r.indices.cpu() for layer, r in routed.items()}


def run_variant(variant: str, preset: str, folder: pathlib.Path, device: str, ids: torch.Tensor, decode_tokens: int,
                result: dict):
    """Load one variant, record its footprint, decode speeds and capture overhead; its logits and routing."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    before = allocated(device)
    start = time.perf_counter()
    s = wb.load(str(folder), preset=preset, context_tokens=ids.shape[1])
    seconds = time.perf_counter() - start
    after = allocated(device)
    result["footprint"][variant] = {
        "path": s.report.mxfp4_path, "load_seconds": round(seconds, 1),
        "measured_weight_bytes": s.report.total_bytes, "planned_weight_bytes": s.report.planned_bytes,
        "planned_need_bytes": s.plan.need_bytes, "device_allocated_bytes": None if after is None else after - before}
    log(f"{variant}: loaded in {seconds:.1f} s, {format_bytes(s.report.total_bytes)} "
        f"(plan {format_bytes(s.report.planned_bytes)})")
    result["decode_tokens_per_s"][variant] = decode_speeds(s, device, decode_tokens)
    result["capture_overhead"][variant] = capture_overhead(s, device, ids)
    log(f"{variant}: decode {result['decode_tokens_per_s'][variant]}, capture {result['capture_overhead'][variant]}")
    return logits_and_routing(s, ids, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random gpt-oss on the CPU (what the tests run)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (deleted after)")
    parser.add_argument("--json", default=None, help="write the results here (default: benchmarks/results.json)")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--trace-tokens", type=int, default=None)
    parser.add_argument("--pretend-free", default=None, help="use this free memory instead of the measured one")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    device = "cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu"
    size = "tiny" if args.tiny else "20b"
    decode_tokens = args.decode_tokens or (32 if args.tiny else 64)
    trace_tokens = args.trace_tokens or (64 if args.tiny else 1024)
    pretend = parse_bytes(args.pretend_free, what="--pretend-free") if args.pretend_free else None
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="workbench-gpu-suite-"))
    folder = workdir / f"gpt-oss-{size}-random-mxfp4"
    result: dict = {"size": size, "device": device, "footprint": {}, "decode_tokens_per_s": {},
                    "capture_overhead": {}, "agreement": {},
                    "machine": {"device": torch.cuda.get_device_name(0) if device != "cpu" else platform.processor() or "cpu",
                                "torch": torch.__version__, "transformers": transformers.__version__},
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if device == "cpu" and not args.tiny:
        log("no CUDA GPU: the full-size suite is meant for a GPU (use --tiny here); running it on the CPU anyway")
    start_all = time.perf_counter()
    try:
        if not (folder / "model.safetensors.index.json").is_file():
            seconds = timed(lambda: write_random_mxfp4(gpt_oss_config(size), folder, seed=0), "cpu")
            result["write_seconds"] = round(seconds, 1)
            log(f"wrote {folder} in {seconds:.1f} s")
        ids = torch.randint(3, 500, (1, trace_tokens), generator=torch.Generator().manual_seed(0))
        reference = None
        for variant, preset in VARIANTS.items():
            try:
                with path_for(variant):
                    why = skip_reason(variant, folder, device, pretend, trace_tokens)
                    if why:
                        log(f"skipping {variant}: {why}")
                        result["footprint"][variant] = {"skipped": why}
                        continue
                    logits, routing = run_variant(variant, preset, folder, device, ids, decode_tokens, result)
            except Exception as e:  # e.g. native kernels that need a hub download on an offline machine
                log(f"{variant} failed: {e!r}")
                result["footprint"][variant] = {"failed": repr(e)}
                continue
            if variant == "bf16":
                reference = (logits, routing)
            elif variant == "mxfp4 packed" and reference is not None:
                ref_logits, ref_routing = reference
                same = [bool(torch.equal(routing[layer], ref_routing[layer])) for layer in ref_routing]
                result["agreement"] = {
                    "logits_max_abs_diff": float((logits - ref_logits).abs().max()),
                    "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                    "routing_identical": all(same), "layers_with_identical_routing": sum(same),
                    "layers": len(same), "tokens": trace_tokens}
                log(f"packed vs bf16: {result['agreement']}")
        main_variant = next((v for v in ("mxfp4 native", "mxfp4 packed", "bf16") if v in result["decode_tokens_per_s"]), None)
        if main_variant:  # the headline figures: the best mxfp4 path that ran (else bf16)
            result["decode_tokens_per_s"] = {**result["decode_tokens_per_s"][main_variant], "variant": main_variant,
                                             "per_variant": result["decode_tokens_per_s"]}
            result["capture_overhead"] = {**result["capture_overhead"][main_variant], "variant": main_variant,
                                          "per_variant": result["capture_overhead"]}
        result["total_seconds"] = round(time.perf_counter() - start_all, 1)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    elif not args.tiny:
        from results_file import record

        record("gpu_suite", result)
    print(text)


if __name__ == "__main__":
    main()
