"""The workbench's packed MXFP4 path against llama.cpp, side by side on one CPU: prefill and decode, interleaved.

Writes a random full-width gpt-oss (the bundled gpt-oss-20b config: hidden 2880, 32 experts top-4, vocab 201,088)
with `--layers` layers in the real MXFP4 layout (benchmarks/random_gpt_oss.py) and gpt-oss's o200k_harmony
tokenizer, converts it with llama.cpp's own converter (`convert_hf_to_gguf.py` of the llama-cpp-python sdist: the
experts stay MXFP4, the rest bf16), and times, round by round in alternating order, on the same token ids:

- prefill: one forward over `--prefill` ids (the last position's logits);
- decode: `--decode` greedy steps with the KV cache after that prompt.

Two parts on the workbench alone, in the same run: the routing capture's cost on this fast path (a routing trace
of the prefill ids against the same plain forward, interleaved; goal <= 1.05x), and the output matrix of a decode
step (201,088 x 2,880: one token's logits) in bf16 against float32, torch's own matvec.

The workbench runs in this process (`preset="mxfp4"`, the C++ kernel); llama.cpp in a worker process
(benchmarks/llama_cpp_worker.py) started with the benchmark virtualenv's Python, where llama-cpp-python is built
(`bash scripts/bench_engines_setup.sh`; never a test or CI dependency). The engines take turns and never run at the
same time; both use `--threads` threads. Figures (tokens/s per round, medians, workbench / llama.cpp ratios, CPU
seconds, load average) go to benchmarks/results.json under "cpu_engines".

    python benchmarks/bench_cpu_engines.py --layers 4 --rounds 3 \
        --llama-python /root/bench-venv/bin/python --llama-src /root/llama/llama_cpp_python-0.3.36/vendor/llama.cpp
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

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_tracing import interleaved  # noqa: E402
from random_gpt_oss import folder_bytes, gpt_oss_config, write_random_mxfp4  # noqa: E402
from results_file import record  # noqa: E402

import workbench as wb  # noqa: E402


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


TINY = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_local_experts=4, num_experts_per_tok=2)  # --tiny: a pipeline check in a minute, not a measurement


def write_model(folder: pathlib.Path, layers: int, tiny: bool = False) -> None:
    from transformers import GenerationConfig

    from workbench.fixtures import o200k

    config = gpt_oss_config("20b", num_hidden_layers=layers, **(TINY if tiny else {}))
    write_random_mxfp4(config, folder, seed=0, tokenizer=False)
    tok = o200k.o200k_harmony_tokenizer()  # the real vocabulary, so llama.cpp's converter recognises it
    tok.save_pretrained(folder)
    ids = tok.convert_tokens_to_ids
    GenerationConfig(eos_token_id=[ids("<|return|>"), ids("<|call|>")], pad_token_id=tok.pad_token_id,
                     bos_token_id=ids("<|startoftext|>")).save_pretrained(folder)


def convert(folder: pathlib.Path, gguf: pathlib.Path, llama_src: pathlib.Path) -> float:
    script = llama_src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} is missing: --llama-src is the vendor/llama.cpp folder of the llama-cpp-python "
                         "sdist (scripts/bench_engines_setup.sh extracts it).")
    t = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(gguf), "--outtype", "bf16"],
                   check=True, cwd=llama_src)
    return time.perf_counter() - t


class LlamaWorker:
    def __init__(self, python: str):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # llama.cpp as it runs by default
        self.proc = subprocess.Popen([python, str(HERE / "llama_cpp_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker stopped (exit code {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def timed(fn) -> dict:
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    out = fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "load_average": round((load + os.getloadavg()[0]) / 2, 1), "out": out}


def workbench_prefill(model, ids: list[int]) -> dict:
    x = torch.tensor([ids])
    with torch.no_grad():
        return timed(lambda: model(input_ids=x, use_cache=False, logits_to_keep=1))


def workbench_decode(model, ids: list[int], steps: int) -> dict:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        state = {"past": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

        def run():
            tokens = []
            for _ in range(steps):
                tokens.append(int(state["token"]))
                o = model(input_ids=state["token"], past_key_values=state["past"], use_cache=True)
                state["past"], state["token"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
            return tokens
        return timed(run)


def llama_timed(worker: LlamaWorker, **msg) -> dict:
    load = os.getloadavg()[0]
    reply = worker.ask(**msg)
    return {"wall_s": reply["wall_s"], "cpu_s": reply["cpu_s"], "load_average": round((load + os.getloadavg()[0]) / 2, 1),
            "out": reply.get("tokens")}


def capture_overhead(s, ids: list[int], reps: int) -> dict:
    """A routing trace of `ids` against the plain forward it wraps (the same call, full logits), interleaved."""
    from workbench.inspect.capture import trace

    x = torch.tensor([ids])

    def plain():
        with torch.no_grad():
            s.model(input_ids=x, use_cache=False)
    return interleaved(plain, {"routing_trace": lambda: trace(s.model, None, s.adapter, x, what=["routing"])}, reps)


def output_matrix(s, reps: int) -> dict:
    """CPU ms of one token's logits through the unembedding (torch's matvec): bf16 as loaded vs float32."""
    head = s.model.get_output_embeddings().weight
    x = torch.randn(1, head.shape[1], generator=torch.Generator().manual_seed(0))
    w32 = head.float()
    out = {"shape": list(head.shape), "dtype": str(head.dtype)}
    with torch.no_grad():
        for name, (a, w) in {"bf16": (x.bfloat16(), head), "float32": (x, w32)}.items():
            torch.nn.functional.linear(a, w)
            out[f"{name}_ms"] = round(min(timed(lambda: torch.nn.functional.linear(a, w))["wall_s"]
                                          for _ in range(reps)) * 1e3, 1)
    out["bf16_gb_per_s"] = round(head.numel() * 2 / (out["bf16_ms"] / 1e3) / 1e9, 1)
    del w32
    return out


def summary(runs: list[dict], tokens: int) -> dict:
    rates = [tokens / r["wall_s"] for r in runs]
    return {"tokens_per_s": [round(x, 3) for x in rates], "median_tokens_per_s": round(statistics.median(rates), 3),
            "cpu_s": [round(r["cpu_s"], 2) for r in runs], "load_average": [r["load_average"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--capture-reps", type=int, default=5)
    parser.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON", "/root/bench-venv/bin/python"))
    parser.add_argument("--llama-src", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("LLAMA_SRC", "/root/llama/llama_cpp_python-0.3.36/vendor/llama.cpp")))
    parser.add_argument("--beside", default="", help="what else ran on the machine meanwhile (recorded)")
    parser.add_argument("--folder", default="/tmp/workbench-cpu-engines")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="hidden 256, 4 experts: checks the pipeline, not recorded")
    args = parser.parse_args()
    args.no_record = args.no_record or args.tiny
    torch.set_num_threads(args.threads)
    folder = pathlib.Path(f"{args.folder}-{args.layers}l{'-tiny' if args.tiny else ''}")
    gguf = folder.with_suffix(".gguf")
    result: dict = {
        "model": f"random full-width gpt-oss (gpt-oss-20b config) at {args.layers} layers, MXFP4 experts, seed 0",
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "processor": platform.machine()},
        "beside": args.beside or "nothing recorded", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "prefill_tokens": args.prefill, "decode_steps": args.decode, "rounds": args.rounds}
    worker = None
    try:
        if not (folder / "model.safetensors.index.json").is_file():
            log(f"writing {folder}")
            write_model(folder, args.layers, args.tiny)
        result["checkpoint_bytes"] = folder_bytes(folder)
        if not gguf.is_file():
            log(f"converting to {gguf} with llama.cpp's converter")
            result["convert_s"] = round(convert(folder, gguf, args.llama_src), 1)
        result["gguf_bytes"] = gguf.stat().st_size
        s = wb.load(str(folder), preset="mxfp4", context_tokens=1024)
        result["workbench_path"] = s.report.mxfp4_kernel
        log(f"workbench: {s.report.mxfp4_kernel}")
        worker = LlamaWorker(args.llama_python)
        info = worker.ask(cmd="load", path=str(gguf), threads=args.threads, n_ctx=args.prefill + args.decode + 16,
                          n_batch=max(512, args.prefill))
        result["llama_cpp"] = {"version": info["version"], "system_info": info["system_info"]}
        log(f"llama.cpp {info['version']}: {info['system_info']}")
        ids = torch.randint(3, 500, (args.prefill,), generator=torch.Generator().manual_seed(0)).tolist()
        workbench_prefill(s.model, ids[:16])  # warm both: map the weights' pages, build buffers
        worker.ask(cmd="prefill", ids=ids[:16])
        runs = {"workbench": {"prefill": [], "decode": []}, "llama.cpp": {"prefill": [], "decode": []}}
        for r in range(args.rounds):
            for engine in (("workbench", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "workbench")):
                if engine == "workbench":
                    p, d = workbench_prefill(s.model, ids), workbench_decode(s.model, ids, args.decode)
                else:
                    p = llama_timed(worker, cmd="prefill", ids=ids)
                    d = llama_timed(worker, cmd="decode", ids=ids, steps=args.decode)
                runs[engine]["prefill"].append(p)
                runs[engine]["decode"].append(d)
                log(f"round {r} {engine}: prefill {args.prefill / p['wall_s']:.2f} tok/s ({p['cpu_s']:.2f} CPU s), "
                    f"decode {args.decode / d['wall_s']:.2f} tok/s ({d['cpu_s']:.2f} CPU s; load {d['load_average']})")
        for engine, kinds in runs.items():
            result[engine] = {"prefill": summary(kinds["prefill"], args.prefill),
                              "decode": summary(kinds["decode"], args.decode)}
        result["ratio_workbench_over_llama_cpp"] = {
            kind: round(result["workbench"][kind]["median_tokens_per_s"] / result["llama.cpp"][kind]["median_tokens_per_s"], 3)
            for kind in ("prefill", "decode")}
        # Not a goal, for orientation: the random model's greedy tokens from both engines (llama.cpp rounds the
        # activations to 8 bits for its MXFP4 dot products; the workbench does not).
        a, b = runs["workbench"]["decode"][0]["out"], runs["llama.cpp"]["decode"][0]["out"]
        result["greedy_tokens_equal_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        log(f"workbench / llama.cpp: {result['ratio_workbench_over_llama_cpp']}; greedy tokens agree for the first "
            f"{result['greedy_tokens_equal_prefix']} of {args.decode}")
        worker.close()  # idle from here: the workbench alone
        result["routing_capture"] = capture_overhead(s, ids, args.capture_reps)
        log(f"routing capture / plain forward on the fast path (CPU time): "
            f"{result['routing_capture']['ratio_median_cpu']}")
        result["output_matrix"] = output_matrix(s, 5)
        log(f"output matrix: {result['output_matrix']}")
        del s
    except BaseException as e:
        result["stopped_by"] = repr(e)
        raise
    finally:
        if worker is not None:
            try:
                worker.close()
            except Exception:
                worker.proc.kill()
        if not args.no_record:
            record("cpu_engines", result)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            gguf.unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("workbench", "llama.cpp")}, indent=1))


if __name__ == "__main__":
    main()
