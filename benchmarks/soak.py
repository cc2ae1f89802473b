"""Soak: one process, many operations on the offline nano gpt-oss. Memory stays flat, nothing slows down, nothing
hangs, and a trace attempted while a stream runs is refused (BusyError) or waits, never mixed into it.

    python benchmarks/soak.py                                    # full size: 200 chats, 1,000 traces, 50 widgets
    python benchmarks/soak.py --chats 20 --traces 100 --widgets 5 --note "training job on both cores"

Operations, each timed, one phase after another:
  chat     s.chat("What is 2 plus 3?", max_new_tokens=8, temperature=0)
  trace    s.trace(TEXT, what=["routing", "attention"])
  widget   widget(s) made, one short generation, a token selected (the inspector's trace and figures), closed
  busy     a stream started; s.trace(...) while it runs must raise BusyError, or return exactly the idle trace;
           then run.stop() and run.result(). Done before the phases, between them and at the end.

Checks (the script exits 1 when one fails; results go to benchmarks/results.json under "soak"):
  memory   resident memory at the end minus after a warm-up of each operation (gc and malloc_trim at both points)
           <= --margin-mb. The warm-up matters: first calls fill caches (kernels, tokenizer, plotly's validators)
           that grow RSS by ~60 MB, and the widgets' own growth levels off only after ~10 of them.
  widgets  ipywidgets' registry of live widgets is back to its size after the warm-up.
  speed    per operation: median time of the last quarter / median of the first quarter <= --slowdown
           (no verdict below 16 operations of a kind).
  hang     no single operation takes --hang-s seconds (faulthandler dumps every thread's stack and exits).
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import os
import pathlib
import platform
import statistics
import sys
import time

# OpenMP workers that spin-wait between ops steal the core the next op needs; on a shared CPU they made one trace
# take 30 ms to 3 s at random (median 550 ms), hiding any real slowdown. Set before torch; see also --threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import torch

import workbench as wb
from workbench.errors import BusyError
from workbench.fixtures import nano_path
from workbench.ui.closing import live_widgets
from workbench.ui.widget import widget

QUESTION = "What is 2 plus 3?"
TEXT = "What is 12 plus 30? Think step by step, then answer."  # one text: every trace costs the same
WHAT = ["routing", "attention"]


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def settled_rss_mb() -> float:
    """Resident memory after a full garbage collection, with glibc's free lists handed back to the system
    (malloc_trim): what is really still held, not what the allocator kept for reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is
        pass
    return rss_mb()


class Watchdog:
    """No operation may take `seconds`: past that faulthandler prints every thread's stack and exits the process
    (a hang in a test run then fails it loudly instead of blocking it forever)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def __enter__(self):
        if self.seconds:
            faulthandler.dump_traceback_later(self.seconds, exit=True)
        return self

    def __exit__(self, *exc):
        if self.seconds:
            faulthandler.cancel_dump_traceback_later()


def op_chat(s, i):
    g = s.chat(QUESTION, max_new_tokens=8, temperature=0)
    assert g.token_ids, "a chat produced no tokens"


def op_trace(s, i):
    t = s.trace(TEXT, what=WHAT)
    assert t.routing is not None and t.attention_layers


def op_widget(s, i):
    w = widget(s, temperature=0.0, max_new_tokens=8)
    try:
        assert w.generate(QUESTION), w.error
        w.wait(timeout=120)
        w.inspector.select_token(0)  # the inspector traces the conversation and draws its figures
    finally:
        w.close()


OPS = {"chat": op_chat, "trace": op_trace, "widget": op_widget}


def busy_check(s, reference) -> str:
    """A trace attempted while a stream runs: BusyError, or the same trace as when idle. Returns which."""
    run = s.stream("Count from 1 to 100, one number per line.", max_new_tokens=400, temperature=0, stop_tokens=[])
    deltas = iter(run)
    try:
        next(deltas)  # the stream is producing tokens now (kept referenced: dropping it would stop the run)
        try:
            t = s.trace(TEXT, what=WHAT)
        except BusyError:
            outcome = "BusyError"
        else:  # it waited for the session: it must be the idle trace, not a mix with the generation
            same = (t.tokens.ids == reference.tokens.ids
                    and torch.equal(t.routing.indices, reference.routing.indices)
                    and all(torch.equal(t.attention(layer, 0), reference.attention(layer, 0))
                            for layer in reference.attention_layers))
            assert same, "a trace taken while a stream ran differs from the idle trace"
            outcome = "waited, equal to the idle trace"
    finally:
        run.stop()
    g = run.result()
    assert g.finish_reason in ("stopped", "length"), g.finish_reason
    assert s.trace(TEXT, what=WHAT).tokens.ids == reference.tokens.ids  # the session is free again
    return outcome


def ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 1)


MIN_FOR_SLOWDOWN = 16  # fewer operations than this: quarters of 1-3 timings say nothing, so no verdict


def slowdown(times: list[float]) -> float | None:
    """Median of the last quarter over median of the first (1.0: no change); None when too few to tell."""
    if len(times) < MIN_FOR_SLOWDOWN:
        return None
    q = len(times) // 4
    return statistics.median(times[-q:]) / statistics.median(times[:q])


def soak(s, chats: int, traces: int, widgets: int, *, warmup: int = 10, hang_s: float | None = 300,
         log=print) -> dict:
    """Run the soak on session `s`; returns the figures (checks are the caller's: see `failures`)."""
    counts = {"chat": chats, "trace": traces, "widget": widgets}
    rss = {"start": settled_rss_mb()}
    reference = s.trace(TEXT, what=WHAT)
    with Watchdog(hang_s):
        busy = [busy_check(s, reference)]
    for op in OPS.values():  # warm-up: first calls fill caches that then stay
        for i in range(warmup):
            with Watchdog(hang_s):
                op(s, i)
    rss["after_warmup"] = settled_rss_mb()
    widgets_after_warmup = live_widgets()

    times: dict[str, list[float]] = {}
    started = time.perf_counter()
    for name, op in OPS.items():
        times[name] = []
        for i in range(counts[name]):
            with Watchdog(hang_s):
                t0 = time.perf_counter()
                op(s, i)
                times[name].append(time.perf_counter() - t0)
        rss[f"after_{name}s"] = settled_rss_mb()
        with Watchdog(hang_s):
            busy.append(busy_check(s, reference))
        median = statistics.median(times[name]) * 1e3 if times[name] else 0.0
        log(f"{counts[name]:>5} {name}s: median {median:.0f} ms, RSS {rss[f'after_{name}s']:.1f} MB")
    rss["end"] = settled_rss_mb()
    return {
        "counts": counts, "warmup_per_op": warmup, "seconds": round(time.perf_counter() - started, 1),
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_warmup_mb": round(rss["end"] - rss["after_warmup"], 1),
        "live_widgets": {"after_warmup": widgets_after_warmup, "end": live_widgets()},
        "median_ms": {k: ms(v) for k, v in times.items() if v},
        "first_quarter_ms": {k: ms(v[:max(1, len(v) // 4)]) for k, v in times.items() if v},
        "last_quarter_ms": {k: ms(v[-max(1, len(v) // 4):]) for k, v in times.items() if v},
        "slowdown_last_vs_first_quarter": {k: None if slowdown(v) is None else round(slowdown(v), 3)
                                           for k, v in times.items() if v},
        "trace_while_streaming": busy,
    }


def failures(result: dict, margin_mb: float, max_slowdown: float) -> list[str]:
    out = []
    if result["rss_growth_after_warmup_mb"] > margin_mb:
        out.append(f"resident memory grew {result['rss_growth_after_warmup_mb']} MB after the warm-up "
                   f"(margin {margin_mb} MB)")
    if result["live_widgets"]["end"] != result["live_widgets"]["after_warmup"]:
        out.append(f"live widgets {result['live_widgets']['after_warmup']} -> {result['live_widgets']['end']}")
    out += [f"{k}: the last quarter is {r}x slower than the first (limit {max_slowdown}x)"
            for k, r in result["slowdown_last_vs_first_quarter"].items() if r is not None and r > max_slowdown]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chats", type=int, default=200)
    ap.add_argument("--traces", type=int, default=1000)
    ap.add_argument("--widgets", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10, help="of each operation, before the baseline")
    ap.add_argument("--margin-mb", type=float, default=30.0, help="allowed RSS growth after the warm-up")
    ap.add_argument("--slowdown", type=float, default=1.5, help="allowed last-quarter / first-quarter time")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steady timings on a shared machine, 7 ms a trace instead of 30-3,000)")
    ap.add_argument("--hang-s", type=float, default=300.0, help="longest one operation may take")
    ap.add_argument("--note", default="", help="what else ran on the machine, recorded with the figures")
    ap.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/results.json alone")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    s = wb.load(str(nano_path()))
    result = soak(s, args.chats, args.traces, args.widgets, warmup=args.warmup, hang_s=args.hang_s)
    failed = failures(result, args.margin_mb, args.slowdown)
    result.update({
        "model": "gpt-oss-nano (workbench.fixtures.nano_path(), bf16, CPU)",
        "limits": {"rss_growth_mb": args.margin_mb, "slowdown": args.slowdown, "hang_s": args.hang_s},
        "passed": not failed, "failures": failed,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before_after": [round(x, 2) for x in (*load_before[:1], os.getloadavg()[0])],
                    "note": args.note, "torch": torch.__version__, "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    if not args.no_record:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from results_file import RESULTS, record

        record("soak", result)
        print(f"written to {RESULTS} under 'soak'")
    print(f"RSS {result['rss_mb']}; growth after warm-up {result['rss_growth_after_warmup_mb']} MB "
          f"(margin {args.margin_mb}); live widgets {result['live_widgets']}; slowdown "
          f"{result['slowdown_last_vs_first_quarter']}; trace while streaming: {set(result['trace_while_streaming'])}")
    print("PASSED" if not failed else "FAILED: " + "; ".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
