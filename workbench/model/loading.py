"""`load_model(model, preset)`: turn a preset row into `from_pretrained` arguments, load, and report honestly.

The session facade (`workbench.load`) wraps the result in a Session; this layer knows nothing above it.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import warnings
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.model import hardware, integrity, memory, mxfp4_packed, planning, sources
from workbench.model.adapters import adapter_for
from workbench.model.presets import Preset, get_preset
from workbench.model.report import (
    LoadReport,
    WarningCollector,
    actual_quantization,
    measure,
    mxfp4_path,
)


@dataclasses.dataclass
class LoadedModel:
    """What loading produced: the model and tokenizer, its adapter, the report and the plan it was checked against."""

    model: Any
    tokenizer: Any
    adapter: Any
    report: LoadReport
    plan: Any
    source: Any


def load_model(
    model: Any,
    preset: str = "auto",
    *,
    check_fit: bool = True,
    attn_implementation: str | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    context_tokens: int = 4096,
    quantize_router: bool = False,
    expert_cache: Any = None,
    check_weights: bool = True,
) -> LoadedModel:
    """Load a causal LM (hub id, local folder or .gguf file) with a named preset.

    Checks the preset and the memory plan before any weight is read, so an impossible request fails
    fast with a message that says what would work. Under int8/nf4, routers and gates stay unquantized
    (quantizing them changes which experts run) unless `quantize_router=True`. Preset "mxfp4" on a gpt-oss
    MXFP4 checkpoint runs transformers' native kernels where they work, else the workbench's packed path
    (workbench/model/mxfp4_packed.py), with an optional cache of dequantized experts (`expert_cache="2GB"`);
    preset "bf16" gives transformers' own dequantize-everything model.

    Weights are checked before they are trusted (workbench/model/integrity.py): the safetensors headers and sizes
    before loading, NaN/inf in the loaded tensors after; a damaged file raises WeightsFileError naming it and what
    to do. The report says what was checked and what it cost; `check_weights=False` skips the checks.
    """
    source = sources.resolve(model, trust_remote_code=trust_remote_code)
    adapter, adapter_note = adapter_for(source.config)
    auto_reason = ""
    if preset == "auto":
        preset, auto_reason = planning.choose_auto(source, context_tokens=context_tokens)
    row = get_preset(preset)
    memory_plan = planning.plan(source, preset, context_tokens=context_tokens, quantize_router=quantize_router,
                                expert_cache=expert_cache)
    memory_plan.require_loadable()
    if check_fit:
        memory_plan.require_fit()

    kwargs = _from_pretrained_kwargs(row, source, offload_folder, quantize_router)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    elif adapter.has_sinks:
        kwargs["attn_implementation"] = "eager"  # SDPA does not support gpt-oss sinks; flash needs hub kernels

    if row.quantization == "bnb-int8":
        _quiet_bnb_cast_warning()

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check = integrity.WeightCheck(skipped="" if check_weights else "check_weights=False")
    files = []
    if check_weights:
        with integrity.timed(check):
            files = integrity.weight_files(source)  # those on this machine: a hub model may download the rest
            integrity.check_files(files, source)

    where = source.path or source.name  # a folder, or a hub id (read from the cache sources.py looked in)
    hub = {"cache_dir": sources.hub_cache_dir()} if source.kind == "hub" else {}
    start = time.perf_counter()
    try:
        with WarningCollector() as collected:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=source.gguf_file,
                                                      trust_remote_code=trust_remote_code, **hub)
            if memory_plan.mxfp4_path == mxfp4_packed.PATH_PACKED:  # no native kernels: keep the experts packed
                loaded = mxfp4_packed.from_pretrained(where, source.config,
                                                      expert_cache_bytes=memory_plan.expert_cache_bytes, **kwargs)
            else:
                loaded = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=trust_remote_code, **hub,
                                                              **kwargs)
    except (SafetensorError, OSError) as e:  # transformers' own errors name no file: find it and say what to do
        error = None if isinstance(e, WorkbenchError) else integrity.read_error(e, source, files)
        if error is None:
            raise
        raise error from e
    loaded.eval()
    seconds = time.perf_counter() - start

    if check_weights:
        with integrity.timed(check):
            downloaded = integrity.weight_files(source)  # a hub model's files, now on this machine
            integrity.check_files([f for f in downloaded if f not in files], source)
            files = downloaded or files
            check.files = len(files)
            integrity.scan(loaded, integrity.weight_map(files), source, check)

    by_group, by_device = measure(loaded, adapter)
    requested_quant = row.quantization
    actual = actual_quantization(loaded)
    notes = list(dict.fromkeys(n for n in (adapter_note, *memory_plan.notes) if n))
    report = LoadReport(
        model=source.name,
        requested_preset="auto" if auto_reason else preset,
        preset=preset,
        auto_reason=auto_reason,
        requested_quantization=requested_quant,
        actual_quantization=actual,
        fallback=_fallback(requested_quant, actual, collected.messages),
        dtypes_by_group=by_group,
        bytes_by_device=by_device,
        planned_bytes=memory_plan.load_bytes,  # as it really loads here (after any fallback)
        attn_implementation=loaded.config._attn_implementation,
        device_map=_device_map(loaded),
        load_seconds=seconds,
        notes=notes,
        transformers_warnings=collected.messages,
        mxfp4_path=mxfp4_path(loaded, sources.is_mxfp4_checkpoint(source.config)),
        expert_cache_bytes=memory_plan.expert_cache_bytes,
        weights_check=check,
    )
    return LoadedModel(model=loaded, tokenizer=tokenizer, adapter=adapter, report=report, plan=memory_plan,
                       source=source)


def _from_pretrained_kwargs(row: Preset, source: "sources.Source", offload_folder: str | None,
                            quantize_router: bool = False) -> dict:
    from transformers import BitsAndBytesConfig, Mxfp4Config

    gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": row.dtype}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    mxfp4_checkpoint = sources.is_mxfp4_checkpoint(source.config)

    if row.quantization == "mxfp4":
        if not mxfp4_checkpoint:
            # Quantize bf16 weights on load; the plan has already refused this where native kernels are missing.
            kwargs["quantization_config"] = Mxfp4Config()
    elif mxfp4_checkpoint:
        # Every other preset runs bf16 experts: ask transformers to dequantize instead of letting it guess.
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    if row.quantization in ("bnb-int8", "bnb-nf4"):
        skip = memory.bnb_skip_modules(source.config, quantize_router=quantize_router)
        if row.quantization == "bnb-int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        else:
            narrow = memory.nf4_narrow_linears(source.config)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=row.dtype,
                llm_int8_skip_modules=skip + narrow)

    if row.device == "cpu":
        kwargs["device_map"] = "cpu"
    elif row.device == "offload":
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = planning.offload_max_memory()
        kwargs["offload_folder"] = offload_folder or tempfile.mkdtemp(prefix="workbench-offload-")
    else:
        kwargs["device_map"] = "cuda:0" if gpu else "cpu"
    return kwargs


def _device_map(model) -> dict[str, str]:
    # transformers sets hf_device_map only when accelerate dispatched the model over several places.
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        return {k: str(v) for k, v in mapping.items()}
    return {"": str(next(model.parameters()).device)}


def _fallback(requested: str | None, actual: str | None, warnings: list[str]) -> str | None:
    """Say plainly when the loaded model is not what the preset asked for, and why."""
    if requested is None or (actual and requested in actual):
        return None
    if requested == "mxfp4":
        reason = hardware.mxfp4_unavailable_reason() or next(
            (w for w in warnings if "dequantiz" in w.lower()), "transformers dequantized the experts")
        return f"mxfp4 -> bf16: experts were dequantized to bf16 (about 3x the memory). Cause: {reason}"
    return f"{requested} was requested but the loaded modules carry {actual or 'no quantization'}"


_BNB_CAST = "MatMul8bitLt: inputs will be cast from"


def _quiet_bnb_cast_warning() -> None:
    """bitsandbytes int8 on a CPU warns on every matmul that inputs are cast to float16 (1,680 lines for one 8-token
    answer); the load report already says what runs, so that one message is dropped, once for the process.
    Recent bitsandbytes logs it, older releases warn it: both are filtered."""
    warnings.filterwarnings("ignore", message=_BNB_CAST)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _drop_bnb_cast not in logger.filters:
        logger.addFilter(_drop_bnb_cast)


def _drop_bnb_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_CAST)
