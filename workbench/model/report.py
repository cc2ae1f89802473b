"""What really loaded: requested vs actual quantization, dtypes per parameter group, memory, placement."""
from __future__ import annotations

import collections
import dataclasses
import html
import logging

import torch
from torch import nn

from workbench.model import mxfp4_kernel
from workbench.model.adapters import Adapter
from workbench.model.integrity import WeightCheck
from workbench.model.mxfp4_packed import (
    PATH_DEQUANTIZED,
    PATH_NATIVE,
    PATH_PACKED,
    PackedMxfp4Experts,
)
from workbench.sizes import format_bytes


@dataclasses.dataclass
class LoadReport:
    model: str
    requested_preset: str  # what the user asked for ("auto" included)
    preset: str  # the preset actually used
    auto_reason: str  # why "auto" chose it ("" otherwise)
    requested_quantization: str | None
    actual_quantization: str | None  # what the loaded modules really are
    fallback: str | None  # e.g. mxfp4 -> bf16, with the cause
    dtypes_by_group: dict[str, dict[str, int]]  # group -> {dtype name: bytes}
    bytes_by_device: dict[str, int]  # measured from the loaded tensors
    planned_bytes: int
    attn_implementation: str
    device_map: dict[str, str]
    load_seconds: float
    notes: list[str]
    transformers_warnings: list[str]
    mxfp4_path: str | None = None  # MXFP4 checkpoints: "native kernels", "packed (workbench)" or "dequantized"
    expert_cache_bytes: int = 0  # the packed path's cache budget (empty at load)
    # the packed path: what runs its expert matmuls ("packed MXFP4, C++ kernel (...)" or "..., plain torch (why)")
    mxfp4_kernel: str | None = None
    weights_check: WeightCheck | None = None  # what was checked for damage before the weights were trusted, its cost

    def __post_init__(self):
        if self.mxfp4_path == PATH_PACKED and self.mxfp4_kernel is None:
            device = "cuda" if any(d.startswith("cuda") for d in self.bytes_by_device) else "cpu"
            self.mxfp4_kernel = mxfp4_kernel.describe(device, cache=self.expert_cache_bytes > 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_device.values())

    def rows(self) -> list[tuple[str, str]]:
        dtypes = "; ".join(
            f"{group}: " + ", ".join(f"{name} {format_bytes(b)}" for name, b in sorted(d.items()))
            for group, d in self.dtypes_by_group.items()
        )
        placement = ", ".join(f"{dev} {format_bytes(b)}" for dev, b in self.bytes_by_device.items())
        devices = sorted(set(self.device_map.values())) if self.device_map else []
        rows = [
            ("model", self.model),
            ("preset", self.preset + (f" (auto: {self.auto_reason})" if self.requested_preset == "auto" else "")),
            ("quantization asked", self.requested_quantization or "none"),
            ("quantization loaded", self.actual_quantization or "none"),
            ("fallback", self.fallback or "none"),
            *([("mxfp4 experts", self.mxfp4_path + (f", expert cache up to {format_bytes(self.expert_cache_bytes)}"
                                                    if self.expert_cache_bytes else ""))] if self.mxfp4_path else []),
            *([("expert matmuls", self.mxfp4_kernel)] if self.mxfp4_kernel else []),
            ("weights by group", dtypes),
            ("measured weights", f"{format_bytes(self.total_bytes)} ({placement}); plan said {format_bytes(self.planned_bytes)}"),
            ("attention", self.attn_implementation),
            ("devices", ", ".join(devices) or "n/a"),
            ("load time", f"{self.load_seconds:.1f} s"),
            *([("weights check", self.weights_check.describe(self.load_seconds))] if self.weights_check else []),
        ]
        rows += [("note", n) for n in self.notes]
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self.rows()
        )
        warn = "".join(f"<li>{html.escape(w)}</li>" for w in self.transformers_warnings)
        extra = f"<details><summary>transformers warnings ({len(self.transformers_warnings)})</summary><ul>{warn}</ul></details>" if warn else ""
        return f"<table>{body}</table>{extra}"


def _dtype_name(t: torch.Tensor) -> str:
    cls = type(t).__name__
    if cls == "Params4bit":
        return f"nf4/fp4 (bnb, packed {str(t.dtype).removeprefix('torch.')})"
    if cls == "Int8Params" or t.dtype == torch.int8:
        return "int8"
    if t.dtype == torch.uint8:
        return "uint8 (packed 4-bit)"  # MXFP4 blocks (two values a byte) and their E8M0 scales
    return str(t.dtype).removeprefix("torch.")


def measure(model: nn.Module, adapter: Adapter) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Bytes of every parameter and buffer, by group and dtype, and by device (meta = offloaded to disk)."""
    by_group: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    by_device: dict[str, int] = collections.defaultdict(int)
    seen: set[int] = set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, t in tensors:
        key = id(t)
        if key in seen:  # tied weights count once
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        by_group[adapter.group_of(name)][_dtype_name(t)] += nbytes
        device = "disk (offloaded)" if t.device.type == "meta" else str(t.device)
        by_device[device] += nbytes
    native = _native_mxfp4_bytes(model)
    if native:
        by_group["experts"]["mxfp4 (native, swizzled)"] += native
        by_device[str(next(model.parameters()).device)] += native
    return {g: dict(d) for g, d in by_group.items()}, dict(by_device)


def actual_quantization(model: nn.Module) -> str | None:
    """The quantization the loaded modules really carry, read from module and parameter types."""
    kinds = set()
    for module in model.modules():
        cls = type(module).__name__
        if cls == "Linear8bitLt":
            kinds.add("bnb-int8")
        elif cls == "Linear4bit":
            kinds.add("bnb-nf4")
        elif isinstance(module, PackedMxfp4Experts) or (cls.startswith("Mxfp4") and _holds_mxfp4(module)):
            kinds.add("mxfp4")
    return "+".join(sorted(kinds)) or None


def mxfp4_path(model: nn.Module, mxfp4_checkpoint: bool) -> str | None:
    """How the experts of an MXFP4 checkpoint really run: native kernels, packed (workbench) or dequantized."""
    for module in model.modules():
        if isinstance(module, PackedMxfp4Experts):
            return PATH_PACKED
        if type(module).__name__.startswith("Mxfp4") and _holds_mxfp4(module):
            return PATH_NATIVE
    return PATH_DEQUANTIZED if mxfp4_checkpoint else None


def _holds_mxfp4(module: nn.Module) -> bool:
    # Native loading swizzles the packed uint8 parameters into triton tensors that replace the Parameters
    # (plain attributes plus `*_precision_config`); before that they are uint8 Parameters.
    if any(getattr(module, f"{proj}_precision_config", None) is not None for proj in ("gate_up_proj", "down_proj")):
        return True
    return any(p.dtype == torch.uint8 for p in module.parameters(recurse=False))


def _native_mxfp4_bytes(model: nn.Module) -> int:
    """Bytes of swizzled mxfp4 expert weights, which are not Parameters and so escape named_parameters()."""
    total = 0
    for module in model.modules():
        for proj in ("gate_up_proj", "down_proj"):
            weight = getattr(module, proj, None)
            if weight is None or isinstance(weight, nn.Parameter) or \
                    getattr(module, f"{proj}_precision_config", None) is None:
                continue
            data = getattr(getattr(weight, "storage", None), "data", weight)
            if isinstance(data, torch.Tensor):
                total += data.numel() * data.element_size()
                scale = getattr(getattr(module, f"{proj}_precision_config"), "weight_scale", None)
                scale = getattr(getattr(scale, "storage", None), "data", scale)
                if isinstance(scale, torch.Tensor):
                    total += scale.numel() * scale.element_size()
    return total


class WarningCollector(logging.Handler):
    """Collects transformers' warnings during loading: its mxfp4 fallback is only a log line."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)
