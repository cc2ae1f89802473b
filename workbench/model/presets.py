"""The quantization presets, as one table of data.

Each preset says how weights are stored and where they go; `loading.load` turns a row into
`from_pretrained` arguments and `planning.plan` turns it into bytes. "auto" is not a row: it is
chosen from the detected hardware and the plan (see `planning.choose_auto`).
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    dtype: torch.dtype  # dtype of every weight the quantizer does not touch
    quantization: str | None = None  # None, "mxfp4", "bnb-int8", "bnb-nf4"
    device: str = "accelerator"  # "accelerator" (first GPU, else CPU), "cpu", or "offload" (GPU -> CPU -> disk)
    needs_gpu: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("mxfp4", "gpt-oss experts kept in the checkpoint's MXFP4 (4.25 bits), the rest bf16; "
               "native kernels on a CUDA GPU with compute capability >= 7.5, else the workbench's packed path "
               "(the chosen experts dequantized per forward; workbench/model/mxfp4_packed.py)",
               torch.bfloat16, quantization="mxfp4"),
        Preset("bf16", "every weight in bfloat16 on the GPU (or the CPU without one)", torch.bfloat16),
        Preset("int8", "bitsandbytes LLM.int8: nn.Linear weights in 8 bits; fused 3-D expert tensors stay bf16",
               torch.bfloat16, quantization="bnb-int8"),
        Preset("nf4", "bitsandbytes NF4: nn.Linear weights in 4 bits (+ block scales); fused 3-D expert tensors stay bf16",
               torch.bfloat16, quantization="bnb-nf4"),
        Preset("offload", "bf16, spread by accelerate over GPU, then CPU RAM, then disk: fits anything, slowly",
               torch.bfloat16, device="offload"),
        Preset("cpu", "float32 on the CPU: the fastest exact choice for small models without a GPU",
               torch.float32, device="cpu"),
    )
}

PRESET_NAMES = tuple(PRESETS) + ("auto",)

# Bytes one stored value takes, per quantization, including its block scales.
BYTES_PER_QUANTIZED_VALUE = {
    "mxfp4": 17 / 32,  # 32 FP4 values in 16 bytes + one E8M0 scale byte
    "bnb-int8": 1.0,  # plus one fp32 scale per output row, added by the planner
    "bnb-nf4": 0.5 + 4 / 64,  # 4 bits + an fp32 absmax per 64-value block (no double quantization)
}


def get_preset(name: str) -> Preset:
    from workbench.errors import PresetError

    if name not in PRESETS:
        raise PresetError(
            f"unknown preset {name!r}. Valid presets: {', '.join(PRESET_NAMES)} "
            "('auto' picks one from your hardware and the memory plan)."
        )
    return PRESETS[name]
