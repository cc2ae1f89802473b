"""The C++ kernel for packed MXFP4 experts (workbench/model/mxfp4_kernel.py) against the plain packed path.

The reference is mxfp4_packed.dequantize (bit-equal to transformers' dequantizer, tests/test_mxfp4_packed.py) with
a float64 matmul, and the plain-torch packed path (`WORKBENCH_MXFP4_KERNEL=0`). Kernel tests skip, saying why,
where the kernel cannot be built; the fallback tests run everywhere.
"""
import functools
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench import fixtures
from workbench.errors import PresetError
from workbench.inspect.routing import routed_forward
from workbench.model import mxfp4_kernel, mxfp4_packed

ENV = mxfp4_kernel.ENV
TEXT = "The quick brown fox jumps over the lazy dog. Experts, routers and sinks: one, two, three!"


def ops():
    found = mxfp4_kernel.kernel()
    if found is None:
        pytest.skip(f"the C++ kernel is not available here: {mxfp4_kernel.status()[1]}")
    return found


def tiny_path():
    return fixtures.tiny_checkpoint("gpt_oss", mxfp4=True)


def nano_path():
    from workbench.fixtures import nano

    try:
        return nano.nano_path("mxfp4")
    except Exception as e:  # an older build (being rebuilt elsewhere) has the same MXFP4 layout: use it
        folder = pathlib.Path(nano.__file__).parent / "nano" / "mxfp4"
        if (folder / "config.json").is_file():
            return folder
        pytest.skip(f"gpt-oss-nano mxfp4 checkpoint not available: {e}")


@functools.cache
def session(path):
    return wb.load(str(path), preset="mxfp4")


def random_packed(experts=4, out=96, inputs=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out, inputs // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 122, (experts, out, inputs // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def count_kernel_calls(monkeypatch):
    calls = []
    real = mxfp4_kernel.grouped_mm
    monkeypatch.setattr(mxfp4_kernel, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def logits_and_routing(s, ids):
    out, routed = routed_forward(s.model, s.adapter, input_ids=ids)
    return out.logits, {layer: r.indices for layer, r in routed.items()}


# ---- the two ops -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_equals_dequantize_for_every_byte_and_scale(dtype):
    blocks = torch.arange(256 * 256 * 2).remainder(256).to(torch.uint8).view(512, 16, 16)  # every byte ...
    scales = torch.arange(512 * 16).remainder(256).to(torch.uint8).view(512, 16)  # ... under every scale
    out = torch.empty(512, 512, dtype=dtype)
    ops().dequantize_into(blocks, scales, mxfp4_kernel.lut(), out)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.view(bits), mxfp4_packed.dequantize(blocks, scales, dtype).view(bits))  # NaN/inf too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_is_within_the_documented_bound_of_the_plain_path(dtype):
    """Few-row experts (direct kernel, 1-16 rows, chunks of 8 included) and many-row ones (dequantize + GEMM),
    empty experts: every output within error_bound of the exact product (float32 activations holding bf16
    values), and within the bound plus one bf16 step of the plain path's bf16 output (bf16 activations)."""
    blocks, scales = random_packed(experts=8)
    counts = [1, 0, 3, 8, 9, 16, 17, 40]
    x = torch.randn(sum(counts), 1024, generator=torch.Generator().manual_seed(1)).bfloat16().to(dtype)
    out = mxfp4_kernel.grouped_mm(ops(), x, blocks, scales, counts)
    assert out.dtype == dtype and out.shape == (sum(counts), 96)
    start = 0
    for e, n in enumerate(counts):
        rows = x[start:start + n].float()
        w = mxfp4_packed.dequantize(blocks[e], scales[e], torch.float32)
        exact = rows.double() @ w.double().t()
        bound = mxfp4_kernel.error_bound(w, rows).t().double()
        plain = torch.mm(w, rows.t()).t().to(dtype).double()  # the plain path: float32 matmul, then x's dtype
        got = out[start:start + n].double()
        if dtype == torch.float32:
            assert ((got - exact).abs() <= bound).all(), e
        step = 2.0**-7 * torch.maximum(got.abs(), plain.abs())  # one bf16 step at most
        assert ((got - plain).abs() <= 2 * bound + step).all(), e
        start += n


def test_one_thread_gives_the_same_bits_as_several():
    blocks, scales = random_packed(out=256)
    counts = [1, 5, 0, 30]
    x = torch.randn(36, 1024, generator=torch.Generator().manual_seed(2)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mxfp4_kernel.grouped_mm(ops(), x, blocks, scales, counts)
        torch.set_num_threads(max(2, threads))
        several = mxfp4_kernel.grouped_mm(ops(), x, blocks, scales, counts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)



# Every path of the kernel on fixed inputs: experts of 1, 2, 5 and 12 rows (each side-by-side width, a chunk of
# 8 and its rest), 37 output rows (tails of every width), and every byte under every scale through dequantize_into.
CROSS_ISA = r"""
import sys
import torch
from workbench.model import mxfp4_kernel

def outputs():
    ops = mxfp4_kernel.kernel()
    assert ops is not None, mxfp4_kernel.status()[1]
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (4, 37, 5, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (4, 37, 5), dtype=torch.uint8, generator=g)
    x = torch.randn(20, 160, generator=g).bfloat16().float()
    lut = mxfp4_kernel.lut()
    every = torch.arange(256 * 256).remainder(256).to(torch.uint8).view(256, 16, 16)
    every_scale = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    out = {"variant": ops.variant(), "matvec": ops.grouped_matvec(x, blocks, scales, lut, [1, 2, 5, 12], 12)}
    for dtype in (torch.float32, torch.bfloat16):
        out[str(dtype)] = torch.empty(256, 512, dtype=dtype)
        ops.dequantize_into(every, every_scale, lut, out[str(dtype)])
    return out

if __name__ == "__main__":
    torch.save(outputs(), sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_instruction_set_gives_the_same_bits(isa, tmp_path):
    """The kernel built for a lower instruction set (WORKBENCH_MXFP4_KERNEL=avx2 / generic, in a process of its own:
    one build per process) gives bit for bit what this CPU's build gives: the order of the sums is fixed."""
    import os
    import platform
    import subprocess
    import sys

    ops()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the instruction-set variants are x86 ones (this is {platform.machine()})")
    script = tmp_path / "cross_isa.py"
    script.write_text(CROSS_ISA)
    namespace = {}
    exec(compile(CROSS_ISA, str(script), "exec"), namespace)
    here = namespace["outputs"]()
    env = dict(os.environ, WORKBENCH_MXFP4_KERNEL=isa, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out.pt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    there = torch.load(tmp_path / "out.pt")
    expected = {"avx2": ("avx2",) if "avx2" in mxfp4_kernel.cpu_flags() else ("generic",), "generic": ("generic",)}
    assert there["variant"] in expected[isa], (there["variant"], here["variant"])
    assert torch.equal(there["matvec"].view(torch.int32), here["matvec"].view(torch.int32))
    assert torch.equal(there["torch.float32"].view(torch.int32), here["torch.float32"].view(torch.int32))  # NaN, inf
    assert torch.equal(there["torch.bfloat16"].view(torch.int16), here["torch.bfloat16"].view(torch.int16))


def test_an_unknown_kernel_setting_is_named(monkeypatch):
    monkeypatch.setenv(ENV, "avx9")
    ok, why = mxfp4_kernel.status(build=False)
    assert not ok and "WORKBENCH_MXFP4_KERNEL=avx9 is not a setting" in why
    assert "is not a setting" in mxfp4_kernel._load.__wrapped__()[1]

# ---- the model on the fast path ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "nano"])
def test_fast_path_routes_like_the_plain_path(name, monkeypatch):
    """Identical routing on the tiny gpt-oss and gpt-oss-nano's MXFP4 layout; logits too (measured: bit-identical,
    these fixtures are narrow enough that the summation order changes no bf16 value)."""
    ops()
    s = session(tiny_path() if name == "tiny" else nano_path())
    assert "C++ kernel" in s.report.mxfp4_kernel
    ids = torch.randint(0, s.model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    calls = count_kernel_calls(monkeypatch)
    fast, fast_routing = logits_and_routing(s, ids)
    decode, _ = logits_and_routing(s, ids[:, :1])  # one token: every expert through the direct kernel
    assert calls
    monkeypatch.setenv(ENV, "0")
    calls.clear()
    plain, plain_routing = logits_and_routing(s, ids)
    plain_decode, _ = logits_and_routing(s, ids[:, :1])
    assert not calls
    assert all(torch.equal(fast_routing[i], plain_routing[i]) for i in plain_routing)
    assert (fast.float() - plain.float()).abs().max() <= 0.02 and torch.equal(fast, plain)
    assert torch.equal(decode, plain_decode)


def test_capture_and_interventions_work_on_the_fast_path(monkeypatch):
    ops()
    s = session(tiny_path())

    def run():
        out = {}
        t = s.trace(TEXT, what=["routing", "attention"])
        out["routing"], out["attention"] = t.routing.indices, t.attention(1, 0)
        with s.ablate_experts({1: [0, 1]}):
            out["ablate"] = s.trace(TEXT, what=["routing"]).routing.indices
        with s.steer_experts({3: {2: 4.0}}):
            out["steer"] = s.trace(TEXT, what=["routing"]).routing.indices
        with s.steer(torch.ones(s.model.config.hidden_size), 1, scale=0.5):
            out["steered"] = s.trace(TEXT, what=["routing"]).routing.indices
        out["chat"] = torch.tensor(s.chat("Hi there", temperature=0, max_new_tokens=8).token_ids)
        return out

    calls = count_kernel_calls(monkeypatch)
    fast = run()
    assert calls
    assert not torch.isin(fast["ablate"][1], torch.tensor([0, 1])).any()
    monkeypatch.setenv(ENV, "0")
    plain = run()
    for key in fast:
        assert torch.equal(fast[key], plain[key]), key


# ---- when the kernel does not run -------------------------------------------------------------------------
def test_forced_off_runs_the_plain_path_and_the_report_says_so(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    s = wb.load(str(tiny_path()), preset="mxfp4")
    assert s.report.mxfp4_kernel.startswith("packed MXFP4, plain torch (WORKBENCH_MXFP4_KERNEL=0")
    assert "expert matmuls" in str(s.report) and "plain torch" in str(wb.plan(str(tiny_path()), "mxfp4"))
    calls = count_kernel_calls(monkeypatch)
    s.trace(TEXT, what=["routing"])
    assert not calls


def test_no_compiler_means_the_plain_path_with_the_reason(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = mxfp4_kernel._load.__wrapped__()  # the build attempt itself, without touching the process's build
    assert reason[0] is None and "no C++ compiler" in reason[1]
    monkeypatch.setattr(mxfp4_kernel, "_load", functools.cache(lambda: reason))
    s = wb.load(str(tiny_path()), preset="mxfp4")
    assert "plain torch (no C++ compiler" in s.report.mxfp4_kernel
    assert "plain torch (no C++ compiler" in str(wb.plan(str(tiny_path()), "mxfp4"))
    calls = count_kernel_calls(monkeypatch)
    logits, _ = logits_and_routing(s, torch.arange(20).view(1, 20))
    assert not calls and torch.isfinite(logits).all()


def test_an_expert_cache_turns_the_kernel_off_and_says_why(monkeypatch):
    """A cache holds float32 matrices for the plain path; the kernel reads 4.25-bit bytes and needs none."""
    ops()
    s = wb.load(str(tiny_path()), preset="mxfp4", expert_cache="2MB")
    assert "plain torch (an expert cache is set" in s.report.mxfp4_kernel
    calls = count_kernel_calls(monkeypatch)
    s.trace(TEXT, what=["routing"])
    assert not calls and mxfp4_packed.expert_cache(s.model).misses > 0
    mxfp4_packed.set_expert_cache(s.model, None)
    assert "C++ kernel" in mxfp4_packed.packed_experts(s.model)[0].kernel_path
    s.trace(TEXT, what=["routing"])
    assert calls


def test_a_truncated_blocks_tensor_is_named(tmp_path, monkeypatch):
    name = "model.layers.1.mlp.experts.gate_up_proj_blocks"
    folder = tmp_path / "broken"
    shutil.copytree(tiny_path(), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensors[name][:, :, :-1].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PresetError, match=name.replace(".", r"\.")):
        wb.load(str(folder), preset="mxfp4")
    # and in memory, where the checkpoint check cannot see it: the kernel names the tensor instead of crashing
    ops()
    blocks, scales = random_packed()
    with pytest.raises(ValueError, match=r"layer 1 gate_up_proj_blocks is torch.uint8 \[4, 96, 31, 16\]"):
        mxfp4_kernel.grouped_mm(ops(), torch.randn(2, 1024), blocks[:, :, :31], scales, [1, 1, 0, 0],
                                name="layer 1 gate_up_proj")


def test_the_build_is_keyed_by_this_cpu(monkeypatch):
    key = mxfp4_kernel.build_key()
    monkeypatch.setattr(mxfp4_kernel, "cpu_flags", lambda: frozenset({"sse2"}))
    assert mxfp4_kernel.build_key() != key  # -march=native code built on another CPU is never loaded here
