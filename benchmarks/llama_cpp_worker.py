"""llama.cpp's side of bench_cpu_engines.py: a worker that runs in the benchmark virtualenv (where llama-cpp-python is
built) and answers one JSON command per line on stdin, so the two engines run in turns, never at the same time.

    {"cmd": "load", "path": "model.gguf", "threads": 2, "n_ctx": 512}
    {"cmd": "prefill", "ids": [...]}                    -> {"wall_s", "cpu_s"}: one batch, last position's logits
    {"cmd": "decode", "ids": [...], "steps": 32}        -> {"wall_s", "cpu_s", "tokens"}: greedy, KV cache
    {"cmd": "quit"}

Only the standard library, numpy and llama_cpp: the workbench is not installed there.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    import llama_cpp

    llm = None
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        if cmd == "load":
            llm = llama_cpp.Llama(model_path=msg["path"], n_ctx=msg.get("n_ctx", 512), n_batch=msg.get("n_batch", 512),
                                  n_threads=msg["threads"], n_threads_batch=msg["threads"], logits_all=False,
                                  verbose=False, use_mmap=True)
            reply = {"ok": True, "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
                     "version": llama_cpp.__version__, "n_vocab": llm.n_vocab()}
        elif cmd == "prefill":
            llm.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            llm.eval(msg["ids"])
            reply = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        elif cmd == "decode":
            llm.reset()
            llm.eval(msg["ids"])
            n_vocab = llm.n_vocab()
            tokens = []
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(msg["steps"]):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                token = int(logits.argmax())
                tokens.append(token)
                llm.eval([token])
            reply = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "tokens": tokens}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
