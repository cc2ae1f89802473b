"""A CPU kernel for the packed MXFP4 experts: multiply straight from the checkpoint's blocks and scales.

The plain packed path (mxfp4_packed.py) dequantizes every chosen expert with torch's index_select in every
forward: 56% of a gpt-oss-20b decode step went there. This module builds a small C++ extension
(csrc/mxfp4_kernel.cpp) with torch's own `torch.utils.cpp_extension.load` at first use and runs, per projection:

- few rows an expert (decode, <= DIRECT_MAX_ROWS): `grouped_matvec`, a dot product per output straight from the
  packed bytes, the FP4 codes decoded in registers through the scale's 16-entry table, float32 accumulation;
  activations are never quantized (llama.cpp quantizes them to 8 bits for its MXFP4 dot products).
- many rows (prefill): `dequantize_into` writes the expert's matrix once into a reused per-thread buffer, then
  torch's GEMM: in bf16 where the CPU has bf16 instructions (avx512_bf16 or AMX) and the activations are bf16
  already, float32 otherwise.
Both use torch's intra-op threads (at::parallel_for). The build is cached under
$WORKBENCH_CACHE/ext (default ~/.cache/gpt-oss-workbench/ext), one folder per source, CPU flags, compiler, torch
and Python: it is compiled with -march=native, so a copy made on another CPU is never reused.

When it does not run (`WORKBENCH_MXFP4_KERNEL=0`, no compiler, a failed build or self-check, a tensor not on
the CPU, an expert cache set, `transformers_arithmetic`), the plain-torch path runs; `describe()` says which and
why, and the load report and the plan print it.

How close to the plain path, and why (the bound the tests check):
- Every decoded weight equals mxfp4_format.dequantize's bit for bit (the table is built with the same ldexp).
- A product of an MXFP4 weight (2 significant bits times a power of two) and a bf16 activation (8 bits) has at
  most 10 significant bits: exact in float32, with or without fma. Only the order of the float32 sums differs
  from MKL's. For a dot product of length K, two float32 summation orders of the same exact terms differ by at
  most 2 * gamma(K) * sum_i |w_i x_i|, gamma(K) = K u / (1 - K u), u = 2^-24 (Higham, Accuracy and Stability
  of Numerical Algorithms, 2nd ed., 4.2): `error_bound` below. Both paths then round to the model's dtype, so
  an output may land one bf16 step apart where the float32 values straddle a rounding boundary.
- The kernel's order is fixed (32 lanes over the blocks, then one reduction tree): the same bits with any
  thread count and instruction set. It is built for the CPU's own (-march=native): AVX-512, else AVX2, else
  plain C++; `WORKBENCH_MXFP4_KERNEL=avx2` or `=generic` builds a lower one (tests compare all three).
- bf16 GEMM (prefill, bf16 activations only): the same exact products, float32 accumulation in oneDNN, the
  output rounded once to bf16, as the plain path rounds its float32 output. oneDNN's bf16 instructions flush
  subnormal inputs to zero (values below 2^-126, which trained weights and activations do not reach).
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading
from typing import Any

import torch

ENV = "WORKBENCH_MXFP4_KERNEL"  # "0" (or off/false/no): never use the kernel; "avx2"/"generic": a lower x86 ISA
OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes", "native")
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "generic": ["-mno-avx512f", "-mno-avx2"]}
SOURCE = pathlib.Path(__file__).with_name("csrc") / "mxfp4_kernel.cpp"
# Rows an expert at or below which the direct kernel beats dequantize + GEMM (measured on gpt-oss-20b's shapes,
# benchmarks/bench_mxfp4_kernel.py --crossover).
DIRECT_MAX_ROWS = 12  # CPU ms for one gate_up expert, direct vs dequantize + GEMM: 8.95 vs 9.19 at 12 rows, 12.2 vs 9.0 at 16
KERNEL = "C++ kernel"
_lock = threading.Lock()
_local = threading.local()


# ---- the machine ---------------------------------------------------------------------------------------
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_gemm() -> bool:
    """Whether the CPU multiplies bf16 natively (avx512_bf16 or AMX): then prefill GEMMs run in bf16."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _setting() -> str:
    return os.environ.get(ENV, "").strip().lower()


def forced_off() -> bool:
    return _setting() in OFF


def requested_isa() -> str | None:
    """The instruction set to build for: "native" (-march=native), "avx2", "generic"; None for a value not known."""
    value = _setting()
    return "native" if value in ON else value if value in ISA_FLAGS else None


def _unknown_setting() -> str:
    return (f"{ENV}={os.environ[ENV]} is not a setting: 0 turns the kernel off, avx2 or generic builds it for a lower "
            f"instruction set, unset builds it for this CPU")


def ext_dir() -> pathlib.Path:
    from workbench.model.cache import default_cache_dir

    return default_cache_dir() / "ext"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def build_key() -> str:
    """What the built code depends on: the source, this CPU's flags (-march=native), compiler, torch, Python."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout if compiler else ""
    parts = [SOURCE.read_bytes(), " ".join(sorted(cpu_flags())).encode(), version.encode(), torch.__version__.encode(),
             sys.version.encode(), platform.machine().encode(), " ".join(ISA_FLAGS[requested_isa() or "native"]).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


# ---- building ------------------------------------------------------------------------------------------
@functools.cache
def _load() -> tuple[Any, str]:
    """(torch.ops namespace, variant) or (None, why not). Built once per process (for the instruction set the
    environment asks at that moment), cached on disk."""
    isa = requested_isa()
    if isa is None:
        return None, _unknown_setting()
    if _compiler() is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')} not found; e.g. apt-get install g++)"
    if shutil.which("ninja") is None:  # torch's builder runs ninja: take the PyPI package's binary if installed
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            return None, "ninja is missing (torch.utils.cpp_extension needs it): pip install ninja"
    try:
        from torch.utils import cpp_extension

        name = f"workbench_mxfp4_{build_key()}"
        folder = ext_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder), is_python_module=False,
                           extra_cflags=["-O3", "-march=native", *ISA_FLAGS[isa], "-fopenmp"], extra_ldflags=["-fopenmp"],
                           verbose=False)
        ops = torch.ops.workbench_mxfp4
        variant = ops.variant()
    except Exception as e:  # a compiler error, a missing header, an unsupported CPU: the plain path runs
        lines = [line for line in str(e).splitlines() if line.strip()]
        return None, f"the C++ kernel did not build here ({type(e).__name__}: {' / '.join(lines[-3:])[:300]})"
    problem = _self_check(ops)
    if problem:
        return None, f"the C++ kernel failed its self-check ({problem})"
    return ops, variant


def _self_check(ops) -> str | None:
    """A small product against dequantize + float64 matmul, every byte and scale through dequantize_into."""
    from workbench.model.mxfp4_format import dequantize

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 40, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 122, (2, 40, 3), dtype=torch.uint8, generator=g)
    x = torch.randn(7, 96, generator=g).bfloat16().float()
    out = ops.grouped_matvec(x, blocks, scales, lut(), [3, 4], 8)
    for e, rows in ((0, slice(0, 3)), (1, slice(3, 7))):
        w = dequantize(blocks[e], scales[e], torch.float32)
        exact = (x[rows].double() @ w.double().t())
        if not ((out[rows].double() - exact).abs() <= error_bound(w, x[rows]).double().t()).all():
            return "grouped_matvec outside its error bound"
    every = torch.arange(256 * 256).remainder(256).to(torch.uint8).view(256, 16, 16)
    every_scale = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        buf = torch.empty(256, 512, dtype=dtype)
        ops.dequantize_into(every, every_scale, lut(), buf)
        if not torch.equal(buf.view(bits), dequantize(every, every_scale, dtype).view(bits)):  # NaN and inf too
            return f"dequantize_into differs from dequantize in {dtype}"
    return None


def kernel(device: torch.device | None = None):
    """The built ops, or None where the plain path must run (forced off, not built, not a CPU tensor)."""
    if forced_off() or (device is not None and device.type != "cpu"):
        return None
    with _lock:
        return _load()[0]


def status(device: str = "cpu", cache: bool = False, build: bool = True) -> tuple[bool, str]:
    """(kernel runs, what runs and why). `build=False` never compiles: it says what a load would do."""
    if device != "cpu":
        return False, "plain torch (the C++ kernel is for the CPU)"
    if forced_off():
        return False, f"plain torch ({ENV}={os.environ[ENV]} turns the C++ kernel off)"
    if requested_isa() is None:
        return False, f"plain torch ({_unknown_setting()})"
    if cache:
        return False, ("plain torch (an expert cache is set: it holds float32 matrices for the plain path, while the "
                       "kernel reads the 4.25-bit packed bytes directly; drop expert_cache= to use the kernel)")
    if build or _load.cache_info().currsize:
        with _lock:
            ops, variant = _load()
        if ops is None:
            return False, f"plain torch ({variant})"
        return True, f"{KERNEL} ({variant}; prefill GEMM in {'bf16' if bf16_gemm() else 'float32'}; {torch.get_num_threads()} threads)"
    if _compiler() is None:
        return False, f"plain torch (no C++ compiler: {os.environ.get('CXX', 'c++')} not found)"
    folder = ext_dir() / f"workbench_mxfp4_{build_key()}"
    if any(folder.glob("*.so")):
        return True, f"{KERNEL} (built for this CPU, cached in {folder})"
    return True, f"{KERNEL} (compiled at the first load, ~20 s, then cached in {ext_dir()})"


def describe(device: str = "cpu", cache: bool = False, build: bool = True) -> str:
    """"packed MXFP4, C++ kernel (...)" or "packed MXFP4, plain torch (why)"."""
    return "packed MXFP4, " + status(device, cache, build)[1]


# ---- the products --------------------------------------------------------------------------------------
@functools.cache
def lut() -> torch.Tensor:
    """float32 [256 scales, 16 codes]: each code's value under each E8M0 scale, as mxfp4_format.dequantize has it."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    codes = torch.tensor(FP4_VALUES, dtype=torch.bfloat16).expand(256, 16).clone()
    exponents = (torch.arange(256, dtype=torch.int32) - 127).view(256, 1)
    return torch.ldexp(codes, exponents).to(torch.bfloat16).float().contiguous()


def error_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[out, rows]: how far two float32 summation orders of x @ w.T (exact products) can be apart."""
    k = w.shape[-1]
    u = 2.0**-24
    gamma = k * u / (1 - k * u)
    return 2 * gamma * (w.double().abs() @ x.double().abs().t()).float()


def _buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for one dequantized matrix, reused across experts, layers and forwards."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (shape, dtype)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype)
    return buffers[key]


def grouped_mm(ops, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: list[int],
               name: str = "experts") -> torch.Tensor:
    """x [N, in] (rows sorted by expert, counts[e] each) times each expert's matrix [out, in] transposed:
    [N, out] in x's dtype. Few-row experts straight from the packed bytes, the others dequantized once + GEMM."""
    n_rows, out_features = x.shape[0], blocks.shape[1]
    if (blocks.dim() != 4 or blocks.shape[-1] != 16 or blocks.shape[2] * 32 != x.shape[1]
            or tuple(scales.shape) != tuple(blocks.shape[:3]) or blocks.dtype != torch.uint8 or len(counts) != blocks.shape[0]):
        raise ValueError(f"{name}_blocks is {blocks.dtype} {list(blocks.shape)} and {name}_scales {scales.dtype} "
                         f"{list(scales.shape)}, but {x.shape[1]} inputs need uint8 [{len(counts)}, out, "
                         f"{x.shape[1] // 32}, 16] and [{len(counts)}, out, {x.shape[1] // 32}]: truncated or mis-shaped")
    direct = any(0 < n <= DIRECT_MAX_ROWS for n in counts)
    if direct:
        out = ops.grouped_matvec(x.float().contiguous(), blocks, scales, lut(), counts, DIRECT_MAX_ROWS).to(x.dtype)
    else:
        out = x.new_empty(n_rows, out_features)
    if all(n <= DIRECT_MAX_ROWS for n in counts):
        return out
    gemm = torch.bfloat16 if x.dtype == torch.bfloat16 and bf16_gemm() else torch.float32  # never round x
    buf = _buffer((out_features, blocks.shape[2] * 32), gemm)
    start = 0
    for expert, n in enumerate(counts):
        if n > DIRECT_MAX_ROWS:
            ops.dequantize_into(blocks[expert], scales[expert], lut(), buf)
            out[start:start + n] = torch.mm(x[start:start + n].to(gemm), buf.t())
        start += n
    return out
