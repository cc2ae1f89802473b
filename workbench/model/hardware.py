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

    Mirrors the checks in transformers' Mxfp4HfQuantizer.validate_environment, which only logs a warning.
    """
    from packaging.version import Version

    if not torch.cuda.is_available():
        return "no CUDA GPU: on the CPU transformers dequantizes mxfp4 experts to bf16 (about 3x the memory)"
    capability = torch.cuda.get_device_capability()
    if capability < (7, 5):
        return f"GPU compute capability {capability[0]}.{capability[1]} < 7.5 (mxfp4 kernels need Turing or newer)"
    triton = package_version("triton")
    if triton is None or Version(triton) < Version("3.4.0"):
        return f"triton >= 3.4 is needed for mxfp4 kernels (found {triton or 'none'}): pip install 'triton>=3.4'"
    kernels = package_version("kernels")
    try:
        from transformers.utils.import_utils import (
            KERNELS_MAX_VERSION,
            KERNELS_MIN_VERSION,
        )
    except ImportError:  # older transformers have no window
        KERNELS_MIN_VERSION, KERNELS_MAX_VERSION = "0.0", None
    if kernels is None:
        return f"the `kernels` package is missing: pip install 'kernels>={KERNELS_MIN_VERSION}'"
    if Version(kernels) < Version(KERNELS_MIN_VERSION) or (
        KERNELS_MAX_VERSION and Version(kernels) >= Version(KERNELS_MAX_VERSION)
    ):
        return (
            f"kernels {kernels} is outside the window this transformers accepts "
            f"[{KERNELS_MIN_VERSION}, {KERNELS_MAX_VERSION}): pip install 'kernels>={KERNELS_MIN_VERSION},<{KERNELS_MAX_VERSION}'"
        )
    return None


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None
