"""Cost of tracing vs a plain forward, and trace sizes from shapes.

1. Routing-only trace vs plain forward: random gpt-oss config (hidden 512, 8 layers, 16 experts, top-4),
   512 tokens, float32 on the CPU. Goal <= 1.05x.
2. Attention capture of every layer (q/k recorded, patterns not computed) vs plain forward: SmolLM2-135M at
   1,024 tokens under its default sdpa. Goal <= 1.3x. Eager `output_attentions=True` measured for comparison.
3. Bytes of a gpt-oss-20b trace at 4,096 tokens computed from its config, vs every fp32 pattern (~51 GB).
4. Batched trace (`--batched`, results under "batched_trace"): s.trace([8 inputs]) vs one plain right-padded
   forward of the same [8, T] ids and attention mask, routing + attention on the random gpt-oss above and
   attention on SmolLM2-135M; rows of 64..256 tokens. Goal >= 0.9x the plain batched forward's throughput.

Repetitions are interleaved (plain, traced, plain, traced, ...) so load from other processes hits both alike;
the figure is the median of per-pair ratios of CPU time (wall-time ratios are recorded too). On a shared
machine, torch runs one thread here (--threads): idle OpenMP threads spin and inflate both measures
unevenly when other processes compete for the cores. Results go to benchmarks/results.json under "tracing".

    python benchmarks/bench_tracing.py [--reps 7] [--threads 1] [--batched]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from results_file import record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from workbench.inspect.budget import trace_bytes  # noqa: E402
from workbench.inspect.capture import trace  # noqa: E402
from workbench.model.adapters import adapter_for  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared machine CPU time is the steadier cost measure."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(plain, variants: dict, reps: int) -> dict:
    """Medians of each and of per-pair ratios (variant / the plain run just before it), wall and CPU time."""
    plain()
    for fn in variants.values():
        fn()  # warm-up
    times = {"plain": []} | {k: [] for k in variants}
    ratios = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            p = timed(plain)
            v = timed(fn)
            times["plain"].append(p)
            times[name].append(v)
            ratios[name].append((v[0] / p[0], v[1] / p[1]))
    med = statistics.median
    return {"wall_seconds_median": {k: round(med(x[0] for x in v), 4) for k, v in times.items()},
            "cpu_seconds_median": {k: round(med(x[1] for x in v), 4) for k, v in times.items()},
            "ratio_median_cpu": {k: round(med(r[1] for r in v), 3) for k, v in ratios.items()},
            "ratio_median_wall": {k: round(med(r[0] for r in v), 3) for k, v in ratios.items()},
            "ratios_cpu": {k: [round(r[1], 3) for r in v] for k, v in ratios.items()},
            "ratios_wall": {k: [round(r[0], 3) for r in v] for k, v in ratios.items()}}


def random_gpt_oss():
    """The random gpt-oss these benchmarks trace: hidden 512, 8 layers, 16 experts top-4, eager, float32, seed 0."""
    config = transformers.GptOssConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                                       num_local_experts=16, num_experts_per_tok=4, num_attention_heads=8,
                                       num_key_value_heads=2, head_dim=64, vocab_size=2048, sliding_window=128,
                                       layer_types=["sliding_attention", "full_attention"] * 4)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(config).eval()


def bench_routing(reps: int) -> dict:
    model = random_gpt_oss()
    adapter, _ = adapter_for(model.config)
    ids = torch.randint(0, 2048, (1, 512))

    def plain():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    result = interleaved(plain, {"routing_trace": lambda: trace(model, None, adapter, ids, what=["routing"])}, reps)
    return {"model": "random gpt-oss (hidden 512, 8 layers, 16 experts top-4, eager, float32)", "tokens": 512,
            **result}


def bench_attention(reps: int) -> dict:
    from workbench.fixtures.checkpoints import smollm2_path

    folder = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    adapter, _ = adapter_for(model.config)
    ids = torch.randint(100, 40000, (1, 1024), generator=torch.Generator().manual_seed(0))
    implementation = model.config._attn_implementation

    def plain():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def attention_trace():
        trace(model, None, adapter, ids, what=["attention"])  # every layer and head, float16 q/k

    result = interleaved(plain, {"attention_trace_all_layers": attention_trace}, reps)
    t = trace(model, None, adapter, ids, what=["attention"])
    pattern_seconds = timed(lambda: t.attention(15))[0]  # one layer, all 9 heads, computed on demand
    # eager output_attentions, for comparison: the same model switched to eager, vs plain eager
    model.set_attn_implementation("eager")

    def plain_eager():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def eager_attentions():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, output_attentions=True)

    eager = interleaved(plain_eager, {"eager_output_attentions": eager_attentions}, max(2, reps // 2))
    model.set_attn_implementation(implementation)
    return {"model": f"SmolLM2-135M-Instruct (float32, {implementation})", "tokens": 1024, **result,
            "one_layer_patterns_seconds": round(pattern_seconds, 4),
            "trace_bytes": sum(v.numel() * v.element_size() for v in t._t.values()),
            "eager_output_attentions_vs_plain_eager": {"cpu": eager["ratio_median_cpu"]["eager_output_attentions"],
                                                       "wall": eager["ratio_median_wall"]["eager_output_attentions"]}}


def bench_batched(reps: int) -> dict:
    """Throughput of a batched trace vs the plain batched forward it wraps (same padded ids, same mask)."""
    from workbench.fixtures.checkpoints import smollm2_path
    from workbench.inspect.capture import pad_right

    lengths = [64, 96, 128, 160, 192, 224, 256, 80]
    g = torch.Generator().manual_seed(0)
    out = {"rows": len(lengths), "lengths": lengths, "tokens": sum(lengths)}
    models = {"gpt_oss_random": (random_gpt_oss(), ["routing", "attention"], 2048),
              "smollm2": (transformers.AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval(),
                          ["attention"], 40000)}
    for name, (model, what, vocab) in models.items():
        adapter, _ = adapter_for(model.config)
        rows = [torch.randint(100, vocab, (n,), generator=g).tolist() for n in lengths]
        ids, mask = pad_right(rows, 0, "cpu")

        def plain():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

        def batched():
            trace(model, None, adapter, rows, what=what, budget=None)

        result = interleaved(plain, {"batched_trace": batched}, reps)
        result["throughput_vs_plain_cpu"] = round(1 / result["ratio_median_cpu"]["batched_trace"], 3)
        result["throughput_vs_plain_wall"] = round(1 / result["ratio_median_wall"]["batched_trace"], 3)
        out[name] = {"what": what, "implementation": model.config._attn_implementation, **result}
    out["goal"] = "batched trace throughput >= 0.9x the plain batched forward"
    return out


def sizes_20b() -> dict:
    config = transformers.GptOssConfig(num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4,
                                       hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                                       num_key_value_heads=8, head_dim=64, vocab_size=201088, sliding_window=128)
    tokens = 4096
    size = trace_bytes(config, None, tokens, what=("routing", "attention"), dtype=torch.bfloat16)
    square = 24 * 64 * tokens * tokens * 4  # every head's full [T, T] float32 pattern
    causal = 24 * 64 * tokens * (tokens + 1) // 2 * 4  # only the causal lower triangle (the ~51 GB figure)
    return {"tokens": tokens, "attention_qk_bytes_bf16": size["attention"], "routing_bytes": size["routing"],
            "trace_bytes": size["stored"],  # what the trace keeps; the budget also counts the forward's transient
            "forward_transient_bytes": size["forward"],
            "residual_bytes_if_requested": trace_bytes(config, None, tokens, what=("residuals",))["residuals"],
            "fp32_patterns_square_bytes": square, "fp32_patterns_causal_triangle_bytes": causal,
            "causal_patterns_over_trace": round(causal / size["stored"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batched", action="store_true", help="only the batched-trace benchmark")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.batched:
        out = {**bench_batched(args.reps), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "date": time.strftime("%Y-%m-%d")}
        record("batched_trace", out)
        print(json.dumps(out, indent=2))
        return
    out = {"routing": bench_routing(args.reps), "attention": bench_attention(args.reps), "gpt_oss_20b_4096": sizes_20b(),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "date": time.strftime("%Y-%m-%d")}
    record("tracing", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
