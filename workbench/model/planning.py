"""Memory plans from the config alone: what each preset really stores, and whether it fits here.

The model is built on the meta device (no memory, no download) and every parameter is counted in its
adapter group. Each preset then says which of those parameters its quantizer really touches *for
this architecture* — inspected on the skeleton, the way transformers would decide — and how many
bytes everything takes. KV cache, activations and a stated margin are added, and the sum is compared
with the free memory of the devices here.

Why one module of about 400 lines: the memory plan of every preset on every family: one table of rules, read top to
bottom.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from workbench.errors import ModelNotFoundError, PresetError
from workbench.model import hardware, memory, mxfp4_packed, sources
from workbench.model.adapters import adapter_for, text_config
from workbench.model.memory import (  # noqa: F401 (re-exported)
    Param,
    activation_bytes,
    dtype_bytes,
    kv_cache_bytes,
    layer_windows,
    param_bytes,
    skeleton,
)
from workbench.model.mxfp4_packed import PATH_DEQUANTIZED, PATH_NATIVE, PATH_PACKED
from workbench.model.plan import (  # noqa: F401 (re-exported)
    GROUPS,
    OVERHEAD_FIXED_BYTES,
    OVERHEAD_FRACTION,
    Plan,
    PlanTable,
)
from workbench.model.presets import PRESETS, Preset, get_preset
from workbench.sizes import format_bytes

# Without a GPU, "auto" takes float32 only when everything needs at most this share of free RAM.
COMFORT_FRACTION = 0.8
KV_REFERENCE_TOKENS = 1000  # kv_bytes_per_1k_tokens is for 1,000 tokens
BNB_PRESETS = ("int8", "nf4")


# ---- building plans ----------------------------------------------------------------------
@dataclasses.dataclass
class _Context:
    """Everything a plan needs that does not depend on the preset."""

    source: sources.Source
    params: tuple[Param, ...]
    devices: list[hardware.Device]
    context_tokens: int
    batch_size: int
    trust_remote_code: bool
    quantize_router: bool = False
    expert_cache: Any = None  # the packed mxfp4 path's cache budget as the user wrote it ("2GB"), or None

    @property
    def gpus(self) -> list[hardware.Device]:
        return [d for d in self.devices if d.name.startswith("cuda")]


def _context(model: Any, context_tokens: int, batch_size: int, devices: list[hardware.Device] | None,
             trust_remote_code: bool, quantize_router: bool = False, expert_cache: Any = None) -> _Context:
    source = _resolve_for_planning(model, trust_remote_code)
    params = skeleton(source.config, trust_remote_code)
    return _Context(source, params, list(devices) if devices is not None else hardware.devices(),
                    context_tokens, batch_size, trust_remote_code, quantize_router, expert_cache)


def _resolve_for_planning(model: Any, trust_remote_code: bool) -> sources.Source:
    """Like sources.resolve, but a well-known hub id that is not downloaded is planned from its bundled config."""
    try:
        return sources.resolve(model, trust_remote_code=trust_remote_code)
    except ModelNotFoundError:
        known = sources.known_source(model) if isinstance(model, str) else None
        if known is None:
            raise
        return known


def _check_possible(ctx: _Context, preset: Preset) -> list[str]:
    """Raise PresetError when the preset cannot work for this model anywhere; return notes about it.
    What only this machine lacks is `_not_loadable_here`'s business: the plan still has numbers."""
    config = ctx.source.config
    method = sources.quant_method(config)
    is_gpt_oss = getattr(config, "model_type", None) == "gpt_oss"
    if preset.quantization == "mxfp4":
        if not is_gpt_oss:
            raise PresetError(
                f"preset 'mxfp4' only applies to gpt-oss (its experts are MXFP4 in the released checkpoint); "
                f"{ctx.source.name} is {config.model_type!r}. "
                f"Presets that work for it: {', '.join(_working_presets(ctx))}."
            )
        if method not in (None, "mxfp4"):
            raise PresetError(f"{ctx.source.name} is already quantized with {method!r}; mxfp4 cannot be applied on top")
    if preset.quantization and preset.quantization.startswith("bnb"):
        if method == "mxfp4":
            raise PresetError(
                f"preset {preset.name!r} (bitsandbytes) cannot load {ctx.source.name}: "
                "its checkpoint is stored in MXFP4 "
                "and transformers refuses a second quantization config (\"The model is quantized with Mxfp4Config but "
                "you are passing a BitsAndBytesConfig config\"). Use preset 'mxfp4' (the experts stay MXFP4: native "
                "kernels, or the workbench's packed path without them), 'bf16', or a bf16 copy of the weights (e.g. a *-BF16 repository) with int8/nf4 — "
                "where the experts still stay bf16, since bitsandbytes converts nn.Linear modules only."
            )
        if method is not None:
            raise PresetError(
                f"{ctx.source.name} is already quantized with {method!r}; bitsandbytes cannot be applied on top"
            )
    if method == "mxfp4" and preset.quantization is None:
        return ["the checkpoint stores the experts in MXFP4: this preset dequantizes them at load "
                "(Mxfp4Config(dequantize=True))"]
    return []


def _not_loadable_here(ctx: _Context, preset: Preset, fallback: str | None) -> str:
    """Why this machine cannot load a preset that is possible for the model (empty when it can)."""
    if preset.quantization and preset.quantization.startswith("bnb") and not hardware.bitsandbytes_available():
        return f"preset {preset.name!r} needs bitsandbytes, which is not installed here: pip install 'bitsandbytes>=0.45'"
    if preset.quantization == "mxfp4" and fallback and not sources.is_mxfp4_checkpoint(ctx.source.config):
        return (f"preset 'mxfp4' on {ctx.source.name} (bf16 weights) would quantize at load, which needs native "
                f"mxfp4 support, unavailable here: {fallback}. Use 'bf16' (or 'offload') here, or load the MXFP4 "
                "checkpoint (e.g. openai/gpt-oss-20b)")
    return ""


def _working_presets(ctx: _Context) -> list[str]:
    """Presets other than mxfp4 that are possible for this model (named in the mxfp4 error)."""
    names = []
    for name, preset in PRESETS.items():
        if preset.quantization == "mxfp4":
            continue
        try:
            _check_possible(ctx, preset)
            names.append(name)
        except PresetError:
            pass
    return names


def _mxfp4_fallback(ctx: _Context) -> str | None:
    """Why native mxfp4 kernels cannot run on these devices (transformers alone would dequantize to bf16),
    or None when they can."""
    if not ctx.gpus and hardware.gpus():  # planning for a machine without the GPUs this one has
        return "no CUDA GPU in this plan (on a CPU, native mxfp4 needs transformers >= 5.24, triton >= 3.5 and `kernels`)"
    return hardware.mxfp4_unavailable_reason()


def _mxfp4_path(ctx: _Context, preset: Preset) -> str | None:
    """How the experts of an MXFP4 checkpoint run under `preset` here: native kernels, packed (the workbench's
    path where kernels are missing) or dequantized (every non-mxfp4 preset); None for other checkpoints
    (mxfp4 on bf16 weights: native where it can load at all)."""
    mxfp4_checkpoint = sources.is_mxfp4_checkpoint(ctx.source.config)
    if preset.quantization != "mxfp4":
        return PATH_DEQUANTIZED if mxfp4_checkpoint else None
    if _mxfp4_fallback(ctx) is None:
        return PATH_NATIVE
    return PATH_PACKED if mxfp4_checkpoint else None


def _count_bytes(ctx: _Context, preset: Preset, packed: bool = False
                 ) -> tuple[dict[str, int], dict[str, int], tuple[str, ...]]:
    """(params per group, bytes per group, groups the preset really quantizes) for this model."""
    params_by_group = dict.fromkeys(GROUPS, 0)
    bytes_by_group = dict.fromkeys(GROUPS, 0.0)
    quantized = set()
    for p in ctx.params:
        nbytes, was_quantized = param_bytes(p, preset, ctx.quantize_router)
        if packed and p.group == "experts" and p.kind != "expert3d":
            nbytes = p.numel * dtype_bytes(preset)  # the packed path keeps the expert biases as stored (bf16)
        params_by_group[p.group] += p.numel
        bytes_by_group[p.group] += nbytes
        if was_quantized:
            quantized.add(p.group)
    return params_by_group, {g: int(b) for g, b in bytes_by_group.items()}, tuple(g for g in GROUPS if g in quantized)


def _make_plan(ctx: _Context, preset: Preset) -> Plan:
    notes = _check_possible(ctx, preset)
    config = ctx.source.config
    fallback = _mxfp4_fallback(ctx) if preset.quantization == "mxfp4" else None
    not_loadable = _not_loadable_here(ctx, preset, fallback)
    if not_loadable:
        fallback = None  # it would quantize natively where it can load at all: plan those numbers
    path = _mxfp4_path(ctx, preset)
    packed = path == PATH_PACKED
    value_bytes = dtype_bytes(preset)
    compute_bytes = mxfp4_packed.compute_dtype(preset.dtype, _device_type(ctx)).itemsize  # of dequantized experts
    cache_bytes = _expert_cache_bytes(ctx, path, compute_bytes)
    if packed:  # no fallback: the experts stay packed, the workbench dequantizes the chosen ones per forward
        notes.append(f"native mxfp4 kernels are unavailable here ({fallback}): the workbench keeps the experts in "
                     "MXFP4 and dequantizes only the experts each forward chooses (packed path)")
        fallback = None
    params_by_group, bytes_by_group, quantized = _count_bytes(ctx, preset, packed)
    total = sum(bytes_by_group.values())
    bf16_total = 2 * sum(params_by_group.values())  # what a dequantizing fallback allocates
    plan = Plan(
        model=ctx.source.name, preset=preset.name, source_note=ctx.source.note,
        dtype=str(preset.dtype).replace("torch.", ""),
        params_by_group=params_by_group, bytes_by_group=bytes_by_group, quantized_groups=quantized,
        total_bytes=total, fallback=fallback, fallback_bytes=bf16_total if fallback else None,
        kv_bytes_per_1k_tokens=kv_cache_bytes(config, KV_REFERENCE_TOKENS, value_bytes),
        kv_bytes=kv_cache_bytes(config, ctx.context_tokens, value_bytes, ctx.batch_size),
        context_tokens=ctx.context_tokens, batch_size=ctx.batch_size,
        activation_bytes=activation_bytes(config, ctx.context_tokens, value_bytes, ctx.batch_size)
        + (mxfp4_packed.working_bytes(config, compute_bytes) if packed else 0),
        overhead_bytes=int(OVERHEAD_FRACTION * (bf16_total if fallback else total)) + OVERHEAD_FIXED_BYTES,
        placement=preset.device, target="", fits={}, free_bytes={}, fits_target=False,
        notes=notes + _quantization_notes(ctx, preset, params_by_group, set(quantized), packed),
        loadable_here=not not_loadable, not_loadable_reason=not_loadable,
        mxfp4_path=path, expert_cache_bytes=cache_bytes, dequantized_bytes=bf16_total if packed else None,
    )
    _place(plan, ctx)
    return plan


def _device_type(ctx: _Context) -> Any:
    import torch

    return torch.device("cuda" if ctx.gpus else "cpu")


def _expert_cache_bytes(ctx: _Context, path: str | None, value_bytes: int) -> int:
    """The packed path's expert cache budget in bytes (0 without one); PresetError for a bad budget, or a budget
    on a path that has no cache."""
    if ctx.expert_cache is None:
        return 0
    if path != PATH_PACKED:
        raise PresetError(
            f"expert_cache={ctx.expert_cache!r} applies only to the packed mxfp4 path (preset 'mxfp4' on an MXFP4 "
            f"gpt-oss checkpoint where native kernels are missing); here the experts run "
            f"{path or 'as plain weights'}: drop expert_cache=.")
    return mxfp4_packed.parse_cache_budget(ctx.expert_cache, text_config(ctx.source.config), value_bytes)


def _quantization_notes(ctx: _Context, preset: Preset, params_by_group: dict[str, int],
                        quantized: set[str], packed: bool = False) -> list[str]:
    notes = []
    adapter, adapter_note = adapter_for(ctx.source.config)
    if adapter_note:
        notes.append(adapter_note)
    total = sum(params_by_group.values())
    experts = params_by_group["experts"]
    if preset.quantization and preset.quantization.startswith("bnb"):
        notes.append("bitsandbytes replaces nn.Linear modules only (lm_head and tied weights are skipped)")
        if preset.quantization == "bnb-nf4":
            narrow = memory.nf4_narrow_linears(ctx.source.config)
            if narrow:
                notes.append(f"{len(narrow)} Linear(s) whose input width is not a multiple of {memory.NF4_BLOCK} stay "
                             f"in {str(preset.dtype).removeprefix('torch.')} (NF4 cannot quantize them): "
                             + ", ".join(narrow[:3]) + (", ..." if len(narrow) > 3 else ""))
        if experts and adapter.is_moe:
            shared = " (the always-on shared expert is a plain nn.Linear MLP and is quantized)" if adapter.shared_expert else ""
            notes.append(
                f"the routed experts ({experts / total:.0%} of the weights with any shared expert) are fused 3-D "
                f"tensors, not nn.Linear: they stay {_short_dtype(preset)} under {preset.name}{shared}; "
                f"quantized groups: {', '.join(sorted(quantized)) or 'none'}"
            )
        if adapter.gates:
            notes.append(
                f"router kept in {_short_dtype(preset)}: routers and gates ({', '.join(adapter.gates)}) are never "
                "quantized, since that would change which experts run (quantize_router=True to quantize them)"
                if not ctx.quantize_router else
                "quantize_router=True: bitsandbytes may quantize routers and gates that are nn.Linear, which can "
                "change which experts run")
    if preset.quantization == "mxfp4":
        notes.append("mxfp4 quantizes the experts' 3-D gate_up_proj/down_proj (17 bytes per 32 values); "
                     + ("their biases and everything else stay bf16" if packed else
                        "their biases stay float32, everything else bf16"))
    return notes


def _short_dtype(preset: Preset) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(preset.dtype).replace("torch.", ""), "")


def _place(plan: Plan, ctx: _Context) -> None:
    """Fill target, per-device fits and whether it fits where the preset puts it."""
    memory = [d for d in ctx.devices if d.name != "disk"]
    need = plan.need_bytes
    plan.free_bytes = {d.name: d.free_bytes for d in ctx.devices}
    plan.fits = {d.name: need <= d.free_bytes for d in memory}
    if plan.placement == "offload":
        chain = ctx.gpus + [d for d in ctx.devices if not d.name.startswith("cuda")]
        plan.target = "offload (" + " -> ".join(d.name for d in chain) + ")"
        # Weights spread over everything; KV cache, activations and the fixed margin stay on the first device.
        first_free = chain[0].free_bytes if chain else 0
        working = plan.kv_bytes + plan.activation_bytes + OVERHEAD_FIXED_BYTES
        plan.fits_target = working <= first_free and need <= sum(d.free_bytes for d in chain)
        plan.notes.append("offload keeps what does not fit on the GPU in CPU RAM, then on disk: much slower")
        return
    if plan.placement == "cpu" or not ctx.gpus:
        target = next((d for d in ctx.devices if d.name == "cpu"), None)
    else:
        target = ctx.gpus[0]
    plan.target = target.name if target else "cpu"
    plan.fits_target = bool(target) and plan.fits.get(target.name, False)


def offload_max_memory(devices: list[hardware.Device] | None = None) -> dict[int | str, int]:
    """`max_memory` for accelerate's device_map="auto" under the offload preset: the free memory of each GPU
    and of CPU RAM, less a margin left for the KV cache, activations and the runtime."""
    found = devices if devices is not None else hardware.devices()
    budget: dict[int | str, int] = {}
    for d in found:
        if d.name.startswith("cuda"):
            budget[int(d.name.split(":")[1])] = max(0, int(0.85 * d.free_bytes) - OVERHEAD_FIXED_BYTES)
        elif d.name == "cpu":
            budget["cpu"] = max(0, int(0.85 * d.free_bytes))
    return budget


# ---- public entry points -----------------------------------------------------------------
def plan(model: Any, preset: str = "auto", *, context_tokens: int = 4096, batch_size: int = 1,
         devices: list[hardware.Device] | None = None, trust_remote_code: bool = False,
         quantize_router: bool = False, expert_cache: Any = None) -> Plan:
    """The memory plan of `model` (hub id, folder, .gguf path or config) under `preset`, from its config alone.

    Planning is arithmetic: it needs none of what loading needs. A preset this machine cannot load (e.g. nf4
    without bitsandbytes) still gets its numbers, with `loadable_here=False` and the reason. `expert_cache`
    ("2GB", bytes): the packed mxfp4 path's cache of dequantized experts, counted in what the plan needs."""
    if preset != "auto":
        get_preset(preset)  # an unknown name fails before any work
    ctx = _context(model, context_tokens, batch_size, devices, trust_remote_code, quantize_router, expert_cache)
    if preset == "auto":
        chosen, reason = _choose(ctx)
        result = _make_plan(ctx, PRESETS[chosen])
        result.notes.insert(0, f"auto chose {chosen!r}: {reason}")
        return result
    return _make_plan(ctx, get_preset(preset))


def plan_all(model: Any, *, context_tokens: int = 4096, batch_size: int = 1,
             devices: list[hardware.Device] | None = None, trust_remote_code: bool = False,
             quantize_router: bool = False) -> PlanTable:
    """Plans for every preset; impossible ones are listed in `.skipped` with their reason."""
    ctx = _context(model, context_tokens, batch_size, devices, trust_remote_code, quantize_router)
    plans, skipped = {}, {}
    for name, preset in PRESETS.items():
        try:
            plans[name] = _make_plan(ctx, preset)
        except PresetError as e:
            skipped[name] = str(e)
    return PlanTable(plans, skipped)


def choose_auto(model: Any, *, context_tokens: int = 4096, batch_size: int = 1,
                devices: list[hardware.Device] | None = None, trust_remote_code: bool = False) -> tuple[str, str]:
    """(preset name, reason) that "auto" picks for this model on these devices."""
    return _choose(_context(model, context_tokens, batch_size, devices, trust_remote_code))


def _try(ctx: _Context, name: str) -> Plan | None:
    try:
        p = _make_plan(ctx, PRESETS[name])
    except PresetError:
        return None
    return p if p.loadable_here else None


def _choose(ctx: _Context) -> tuple[str, str]:
    if ctx.gpus:
        return _choose_gpu(ctx)
    return _choose_cpu(ctx)


def _choose_gpu(ctx: _Context) -> tuple[str, str]:
    gpu = ctx.gpus[0].name
    packed = None
    if sources.is_mxfp4_checkpoint(ctx.source.config):
        p = _try(ctx, "mxfp4")
        if p and p.mxfp4_path == PATH_NATIVE and p.fits_target:
            return "mxfp4", f"gpt-oss MXFP4 checkpoint with native mxfp4 support on {gpu}: {format_bytes(p.need_bytes)} fits"
        packed = p if p and p.mxfp4_path == PATH_PACKED and p.fits_target else None
    p = _try(ctx, "bf16")
    if p and p.fits_target:
        return "bf16", f"bf16 fits on {gpu} ({format_bytes(p.need_bytes)} of {format_bytes(p.free_bytes[gpu])} free)"
    if packed:
        return "mxfp4", (f"bf16 does not fit on {gpu} and native mxfp4 kernels are missing; the packed mxfp4 path "
                         f"fits ({format_bytes(packed.need_bytes)})")
    for name in BNB_PRESETS:
        q = _try(ctx, name)
        if q and q.fits_target:
            return name, f"bf16 does not fit on {gpu}; {name} does ({format_bytes(q.need_bytes)})"
    return "offload", f"no single-device preset fits on {gpu}: offloading to CPU RAM and disk"


def _choose_cpu(ctx: _Context) -> tuple[str, str]:
    cpu = next((d for d in ctx.devices if d.name == "cpu"), None)
    free = cpu.free_bytes if cpu else 0
    p = _try(ctx, "cpu")
    if p and p.need_bytes <= COMFORT_FRACTION * free:
        return "cpu", f"no GPU; float32 needs {format_bytes(p.need_bytes)}, comfortably within {format_bytes(free)} of free RAM"
    p = _try(ctx, "bf16")
    if p and p.fits_target:
        return "bf16", f"no GPU; float32 would be tight, bf16 needs {format_bytes(p.need_bytes)} of {format_bytes(free)} free RAM"
    p = _try(ctx, "mxfp4") if sources.is_mxfp4_checkpoint(ctx.source.config) else None
    if p and p.mxfp4_path == PATH_PACKED and p.fits_target:
        return "mxfp4", (f"no GPU and bf16 does not fit in {format_bytes(free)} of free RAM; the packed mxfp4 path "
                         f"needs {format_bytes(p.need_bytes)}")
    return "offload", f"no GPU and bf16 does not fit in {format_bytes(free)} of free RAM: offloading to disk"
