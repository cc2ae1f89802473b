"""Throughput of routing_stats vs a plain batched forward over the same texts with the same batching.

Model: a random gpt-oss config (hidden 512, 8 layers, 16 experts top-4, eager attention) written to disk and
loaded with `wb.load(..., preset="cpu")` (float32), the fixture tokenizer. Corpus: 32 texts of 20-200 words,
batches of 8, truncated to 256 tokens, right-padded. The plain run does the same work routing_stats does
apart from counting: tokenize, pad, one forward per batch with the same arguments (attention mask,
use_cache=False, logits_to_keep=1). Goal: stats throughput >= 0.9x the plain forward's.

Repetitions are interleaved (plain, stats, plain, stats, ...) and the figure is the median of per-pair ratios
(benchmarks/bench_tracing.py explains why, and why torch runs one thread here). Results go to
benchmarks/results.json under "routing_stats".

    python benchmarks/bench_routing_stats.py [--reps 3] [--texts 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_tracing import interleaved  # noqa: E402
from results_file import record  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import workbench as wb  # noqa: E402
from workbench.analysis.routing_stats import (  # noqa: E402
    forward_kwargs,
    pad_right,
    routing_stats,
    token_ids,
)
from workbench.fixtures.tokenizer import build_tokenizer  # noqa: E402

WORDS = "the cat sat on a mat while seven tired dogs barked at noon under grey skies and slept".split()


def write_model(folder: pathlib.Path) -> None:
    tokenizer = build_tokenizer(harmony=True)
    config = transformers.GptOssConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                                       num_local_experts=16, num_experts_per_tok=4, num_attention_heads=8,
                                       num_key_value_heads=2, head_dim=64, vocab_size=len(tokenizer),
                                       sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 4,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def corpus(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(20, 200, (1,),
            generator=g)),), generator=g)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_model(pathlib.Path(tmp))
        s = wb.load(tmp, preset="cpu")
    texts = corpus(args.texts)
    bs, max_tokens, extra = args.batch_size, args.max_tokens, forward_kwargs(s.model)

    def plain():
        for i in range(0, len(texts), bs):
            ids = [token_ids(s.tokenizer, t)[:max_tokens] for t in texts[i:i + bs]]
            input_ids, mask = pad_right(ids, s.tokenizer.pad_token_id, "cpu")
            with torch.no_grad():
                s.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra)

    def stats():
        routing_stats(s, texts, batch_size=bs, max_tokens=max_tokens, progress=False)

    def stats_no_table():
        routing_stats(s, texts, batch_size=bs, max_tokens=max_tokens, progress=False, token_table=False)

    result = interleaved(plain, {"routing_stats": stats, "routing_stats_no_token_table": stats_no_table}, args.reps)
    tokens = routing_stats(s, texts, batch_size=bs, max_tokens=max_tokens, progress=False).tokens
    wall = result["wall_seconds_median"]
    out = {"model": "random gpt-oss (hidden 512, 8 layers, 16 experts top-4, eager, float32), preset cpu",
           "texts": len(texts), "batch_size": bs, "max_tokens": max_tokens, "tokens": tokens,
           "tokens_per_second_median": {k: round(tokens / v, 1) for k, v in wall.items()},
           # throughput of stats relative to plain = 1 / time ratio; goal >= 0.9
           "throughput_vs_plain_cpu": {k: round(1 / v, 3) for k, v in result["ratio_median_cpu"].items()},
           "throughput_vs_plain_wall": {k: round(1 / v, 3) for k, v in result["ratio_median_wall"].items()},
           **result,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "date": time.strftime("%Y-%m-%d")}
    record("routing_stats", out)
    print(json.dumps({k: out[k] for k in ("tokens", "tokens_per_second_median", "throughput_vs_plain_cpu",
                                          "throughput_vs_plain_wall")}, indent=2))


if __name__ == "__main__":
    main()
