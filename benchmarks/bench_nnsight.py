"""The same attention capture with nnsight and with the workbench, side by side: time, peak memory, equality.

SmolLM2-135M-Instruct, float32, the same 1,024 random token ids (seed 0, as bench_tracing.py), the attention
pattern of every layer (30 layers x 9 heads).

- nnsight, as researchers write it: the model loaded with attn_implementation="eager" (only eager returns the
  weights), the loaded HF object wrapped in `nnsight.LanguageModel`, and

      with lm.trace(ids):
          weights = nnsight.save([layer.self_attn.output[1] for layer in lm.model.layers])

  No torch.no_grad(): nnsight does not turn autograd off, so the saved weights carry a graph of the whole
  forward. Measured as written ("nnsight") and inside torch.no_grad() ("nnsight_no_grad"), the fairer figure.
- workbench: `trace(model, tokenizer, adapter, ids, what=["attention"])` on the model's default sdpa, which
  records post-RoPE q/k (float16 storage by default), then either nothing more ("workbench": capture only) or
  every layer's [heads, T, T] pattern materialised and kept ("workbench_patterns"), so that both sides end
  with every pattern in hand.
- plain forwards (no_grad, use_cache=False) under sdpa ("plain") and eager ("plain_eager") as baselines.

Time: all variants in one process, interleaved (order rotated each repetition so none always runs after the
same neighbour), one warm-up each, then --reps repetitions; medians of CPU and wall seconds and medians of
per-repetition ratios (workbench / nnsight in the same repetition; each vs its plain forward).
Peak memory: each variant in a fresh subprocess (`--child NAME`) that loads the model (and reads every weight:
float32 safetensors are memory-mapped and only paged in when first read), records its RSS, resets
the kernel's high-water mark (/proc/self/clear_refs, so the load's own transient peak does not hide the
capture's), runs the capture once keeping its result alive, and reads getrusage(RUSAGE_SELF).ru_maxrss (KB)
and VmHWM. "increase" = peak - RSS after loading = what the capture added. The parent imports nothing heavy
before spawning the children: with vfork a child's ru_maxrss can otherwise inherit the parent's peak.
Equality: every layer's pattern from nnsight's eager weights vs the workbench's. The workbench runs an sdpa
forward, so hidden states (hence q/k) of later layers differ from eager's by float rounding: with float32 q/k
storage the patterns agree to ~1e-5 (measured 1.3e-5; on the eager model itself they are bitwise equal), with
the default float16 storage to ~3e-3 (measured 3.0e-3, the same as on the eager model: the storage dominates).

Threads: torch runs one thread (--threads 1, as bench_tracing.py). This is a shared 2-core machine: with
more threads, idle OpenMP workers spin-wait and, when other processes hold the cores, inflate the measures of
both sides unevenly; one thread keeps the ratio steady. Results go to benchmarks/results.json under "nnsight".

    python benchmarks/bench_nnsight.py [--reps 5] [--threads 1] [--tokens 1024]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

from results_file import record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "plain_eager", "workbench", "workbench_patterns", "nnsight", "nnsight_no_grad")
EAGER = {"plain_eager", "nnsight", "nnsight_no_grad"}


# ---- memory helpers (stdlib only) --------------------------------------------------------------------
def status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in KB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---- model and the captures --------------------------------------------------------------------------
def setup(threads: int, tokens: int, eager: bool, sdpa: bool) -> dict:
    """Load what the variants need: the sdpa model (workbench, plain) and/or the eager one wrapped in nnsight."""
    import warnings

    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from workbench.fixtures.checkpoints import smollm2_path
    from workbench.model.adapters import adapter_for

    torch.set_num_threads(threads)
    folder = smollm2_path()
    env = {"torch": torch, "ids": torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0)),
           "tokenizer": transformers.AutoTokenizer.from_pretrained(folder)}
    if sdpa:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        env["model"], env["adapter"] = model, adapter_for(model.config)[0]
        env["implementation"] = model.config._attn_implementation
    if eager:
        import nnsight

        eager_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            env["lm"] = nnsight.LanguageModel(eager_model, tokenizer=env["tokenizer"])
        env["nnsight_warnings"] = sorted({str(w.message) for w in caught})
        env["eager_model"], env["nnsight"] = eager_model, nnsight
    # float32 safetensors are memory-mapped: weights become resident only when first read. Read them all now,
    # so "RSS after loading" includes the weights and the first capture is not charged for paging them in.
    with torch.no_grad():
        for key in ("model", "eager_model"):
            if key in env:
                for p in env[key].parameters():
                    p.sum()
    return env


def runner(name: str, env: dict):
    """A no-argument function running one variant and returning what it captured (kept alive by the caller)."""
    torch, ids = env["torch"], env["ids"]
    if name in ("plain", "plain_eager"):
        model = env["model" if name == "plain" else "eager_model"]

        def plain():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits
        return plain
    if name in ("workbench", "workbench_patterns"):
        from workbench.inspect.capture import trace

        model, tokenizer, adapter = env["model"], env["tokenizer"], env["adapter"]

        def workbench():
            t = trace(model, tokenizer, adapter, ids, what=["attention"])
            if name == "workbench":
                return t
            return t, [t.attention(layer) for layer in t.layers]  # every [heads, T, T] pattern, in hand
        return workbench
    lm, nnsight = env["lm"], env["nnsight"]

    def nnsight_capture():
        with lm.trace(ids):
            weights = nnsight.save([layer.self_attn.output[1] for layer in lm.model.layers])
        return weights

    if name == "nnsight":
        return nnsight_capture

    def nnsight_no_grad():
        with torch.no_grad():
            return nnsight_capture()
    return nnsight_no_grad


# ---- peak memory: one fresh process per variant -------------------------------------------------------
def child(name: str, threads: int, tokens: int) -> None:
    env = setup(threads, tokens, eager=name in EAGER, sdpa=name not in EAGER)
    run = runner(name, env)
    import gc

    gc.collect()
    loaded_rss, maxrss_after_load = status_kb("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    was_reset = reset_peak()
    kept = run()  # noqa: F841 - held so the peak is measured with the result in hand
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    hwm, end_rss = status_kb("VmHWM"), status_kb("VmRSS")
    peak = max(maxrss, hwm) if was_reset else maxrss
    print(json.dumps({"variant": name, "loaded_rss_kb": loaded_rss, "maxrss_after_load_kb": maxrss_after_load,
                      "peak_reset_after_load": was_reset, "ru_maxrss_kb": maxrss, "vm_hwm_kb": hwm,
                      "rss_at_end_kb": end_rss, "peak_kb": peak, "increase_kb": peak - loaded_rss}))


def measure_memory(threads: int, tokens: int) -> dict:
    out = {}
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(threads),
                               "--tokens", str(tokens)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"child {name} failed:\n{proc.stderr[-3000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {name}: peak {out[name]['peak_kb'] / 1024:.0f} MB, "
              f"+{out[name]['increase_kb'] / 1024:.0f} MB over the loaded model", flush=True)
    return out


# ---- time: all variants in this process, interleaved ---------------------------------------------------
def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process); the result is dropped before the clock is read again."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def measure_time(env: dict, reps: int) -> dict:
    fns = {name: runner(name, env) for name in VARIANTS}
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in VARIANTS}
    for r in range(reps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for name in order:
            times[name].append(timed(fns[name]))
        print(f"  rep {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1][1]:.2f}s" for n in VARIANTS), flush=True)
    med = statistics.median
    pairs = {"workbench/nnsight": ("workbench", "nnsight"),
             "workbench/nnsight_no_grad": ("workbench", "nnsight_no_grad"),
             "workbench_patterns/nnsight": ("workbench_patterns", "nnsight"),
             "workbench_patterns/nnsight_no_grad": ("workbench_patterns", "nnsight_no_grad"),
             "workbench/plain": ("workbench", "plain"),
             "workbench_patterns/plain": ("workbench_patterns", "plain"),
             "nnsight/plain_eager": ("nnsight", "plain_eager"),
             "nnsight_no_grad/plain_eager": ("nnsight_no_grad", "plain_eager"),
             "nnsight/plain": ("nnsight", "plain"),
             "plain_eager/plain": ("plain_eager", "plain")}

    def ratios(a, b, i):
        return [x[i] / y[i] for x, y in zip(times[a], times[b])]
    return {"wall_seconds_median": {k: round(med(x[0] for x in v), 4) for k, v in times.items()},
            "cpu_seconds_median": {k: round(med(x[1] for x in v), 4) for k, v in times.items()},
            "ratio_median_cpu": {k: round(med(ratios(a, b, 1)), 3) for k, (a, b) in pairs.items()},
            "ratio_median_wall": {k: round(med(ratios(a, b, 0)), 3) for k, (a, b) in pairs.items()},
            "ratios_cpu": {k: [round(x, 3) for x in ratios(a, b, 1)] for k, (a, b) in pairs.items()
                           if k.startswith("workbench")}}


def check_equality(env: dict) -> dict:
    """Max |nnsight eager weights - workbench pattern| over every layer and head (default and float32 q/k)."""
    torch, ids = env["torch"], env["ids"]
    from workbench.inspect.capture import trace

    weights = runner("nnsight_no_grad", env)()
    assert all(w is not None for w in weights), "eager self_attn.output[1] is None: no attention weights"
    with torch.no_grad():
        reference = env["eager_model"](input_ids=ids, use_cache=False, output_attentions=True).attentions
    out = {"nnsight_vs_eager_output_attentions": max((w - a).abs().max().item() for w, a in zip(weights, reference))}
    del reference
    for label, dtype in (("default_float16_qk", None), ("float32_qk", torch.float32)):
        t = trace(env["model"], env["tokenizer"], env["adapter"], ids, what=["attention"], dtype=dtype)
        diffs = [(t.attention(layer) - weights[layer][0]).abs().max().item() for layer in t.layers]
        out[f"workbench_{label}_max_abs_diff"] = max(diffs)
        out[f"workbench_{label}_worst_layer"] = diffs.index(max(diffs))
    out["weights_shape"] = list(weights[0].shape)
    out["layers"] = len(weights)
    return {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.tokens)
        return

    print("peak memory, one fresh process per variant:", flush=True)
    memory = measure_memory(args.threads, args.tokens)  # first, while this process is still small
    env = setup(args.threads, args.tokens, eager=True, sdpa=True)
    print(f"time, {args.reps} interleaved repetitions after a warm-up (CPU seconds):", flush=True)
    timing = measure_time(env, args.reps)
    equality = check_equality(env)

    import nnsight
    import torch
    import transformers

    def mb(kb):
        return round(kb / 1024, 1)
    mem = {name: {"peak_MB": mb(m["peak_kb"]), "loaded_MB": mb(m["loaded_rss_kb"]),
                  "increase_MB": mb(m["increase_kb"]), **m} for name, m in memory.items()}
    inc = {name: m["increase_kb"] for name, m in memory.items()}
    out = {
        "model": f"SmolLM2-135M-Instruct (float32; workbench on {env['implementation']}, nnsight on eager)",
        "tokens": args.tokens, "capture": "attention pattern of every layer (30 layers x 9 heads)",
        "nnsight_code": "with lm.trace(ids): weights = nnsight.save([layer.self_attn.output[1] for layer in "
                        "lm.model.layers])  # lm = nnsight.LanguageModel(eager HF model, tokenizer=tok)",
        "workbench_code": "t = trace(model, tok, adapter, ids, what=['attention']); "
                          "[t.attention(l) for l in t.layers]  # the latter only for workbench_patterns",
        "reps": args.reps, **timing,
        "memory": mem,
        "memory_increase_ratio": {
            "workbench/nnsight": round(inc["workbench"] / inc["nnsight"], 4),
            "workbench/nnsight_no_grad": round(inc["workbench"] / inc["nnsight_no_grad"], 4),
            "workbench_patterns/nnsight": round(inc["workbench_patterns"] / inc["nnsight"], 4),
            "workbench_patterns/nnsight_no_grad": round(inc["workbench_patterns"] / inc["nnsight_no_grad"], 4)},
        "memory_peak_ratio": {
            "workbench/nnsight": round(memory["workbench"]["peak_kb"] / memory["nnsight"]["peak_kb"], 3),
            "workbench_patterns/nnsight": round(memory["workbench_patterns"]["peak_kb"]
                                                / memory["nnsight"]["peak_kb"], 3)},
        "equality": equality,
        "nnsight_warnings": env["nnsight_warnings"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "nnsight": nnsight.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    record("nnsight", out)

    cpu, wall = timing["cpu_seconds_median"], timing["wall_seconds_median"]
    print(f"\n{'variant':<20}{'CPU s':>8}{'wall s':>8}{'peak MB':>10}{'+MB':>9}")
    for name in VARIANTS:
        print(f"{name:<20}{cpu[name]:>8.2f}{wall[name]:>8.2f}{mem[name]['peak_MB']:>10.0f}"
              f"{mem[name]['increase_MB']:>9.0f}")
    print("\nratios (median of per-repetition CPU-time ratios):")
    for k, v in timing["ratio_median_cpu"].items():
        print(f"  {k:<36}{v:>7.3f}")
    print("memory increase ratios:", out["memory_increase_ratio"])
    print("equality:", equality)


if __name__ == "__main__":
    main()
