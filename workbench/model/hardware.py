"""What this machine has: accelerators, memory, and whether native mxfp4 kernels can run."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil

import psutil
import torch


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # "cuda:0", "cpu", "disk"
    description: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None


def devices(offload_folder: str | None = None) -> list[Device]:
    """Every place weights can live here, fastest first: GPUs, then CPU RAM, then disk."""
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            found.append(Device(f"cuda:{i}", props.name, total, free, torch.cuda.get_device_capability(i)))
    vm = psutil.virtual_memory()
    found.append(Device("cpu", f"CPU RAM ({os.cpu_count()} cores)", vm.total, vm.available))
    disk = shutil.disk_usage(offload_folder or os.getcwd())
    found.append(Device("disk", "disk (offload folder)", disk.total, disk.free))
    return found


def gpus() -> list[Device]:
    return [d for d in devices() if d.name.startswith("cuda")]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def mxfp4_unavailable_reason() -> str | None:
    """Why transformers would dequantize an mxfp4 checkpoint to bf16 here; None when native mxfp4 can run.

    The decision is transformers' own: its Mxfp4HfQuantizer.validate_environment runs on a fresh quantizer (it only
    logs a warning and sets `dequantize`), so the answer follows the installed version (5.24 runs native mxfp4 on a
    CPU too, with triton >= 3.5 and `kernels`). The explanation is rebuilt from the same checks, since transformers
    logs each warning only once per process. Native kernels also need a hub download of the kernel at load time.
    """
    try:
        from transformers import Mxfp4Config
        from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer

        import logging

        quantizer = Mxfp4HfQuantizer(Mxfp4Config())
        quantizer.pre_quantized = True
        log = logging.getLogger("transformers.quantizers.quantizer_mxfp4")
        level = log.level
        log.setLevel(logging.ERROR)  # its warning is ours to word; the load report says it
        try:
            quantizer.validate_environment()
        finally:
            log.setLevel(level)
        if not quantizer.quantization_config.dequantize:
            return None
    except Exception as e:  # an older or newer transformers whose quantizer does not work this way
        return f"transformers' mxfp4 check could not run here ({type(e).__name__}: {e})"
    return _mxfp4_explanation()


def _mxfp4_explanation() -> str:
    from packaging.version import Version

    tail = "; transformers alone would dequantize the experts to bf16 (about 3x the memory)"
    if torch.cuda.is_available():
        where, need = "a CUDA GPU", "3.4.0"
        capability = torch.cuda.get_device_capability()
        if capability < (7, 5):
            return f"GPU compute capability {capability[0]}.{capability[1]} < 7.5 (mxfp4 kernels need Turing or newer)" + tail
    else:
        where, need = ("an XPU", "3.5.0") if hasattr(torch, "xpu") and torch.xpu.is_available() else ("the CPU", "3.5.0")
    triton = package_version("triton")
    if triton is None or Version(triton) < Version(need):
        return (f"native mxfp4 on {where} needs triton >= {need[:3]} (found {triton or 'none'}): "
                f"pip install 'triton>={need[:3]}'" + tail)
    kernels = package_version("kernels")
    try:
        from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION
    except ImportError:  # older transformers have no window
        KERNELS_MIN_VERSION, KERNELS_MAX_VERSION = "0.0", None
    window = f"'kernels>={KERNELS_MIN_VERSION}" + (f",<{KERNELS_MAX_VERSION}'" if KERNELS_MAX_VERSION else "'")
    if kernels is None:
        return f"native mxfp4 on {where} needs the `kernels` package: pip install {window}" + tail
    return f"kernels {kernels} is outside the window this transformers accepts: pip install {window}" + tail


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None
