"""A memory plan and how it reads: per-group bytes, KV cache, activations, margin, and where it fits.

`planning` builds these from a config; this module only holds and shows the numbers.
"""
from __future__ import annotations

import dataclasses
import html

from workbench.errors import DoesNotFitError, PresetError
from workbench.sizes import format_bytes

GROUPS = ("experts", "router", "attention", "embeddings", "other")
# The margin added to weights + KV cache + activations: allocator slack, CUDA context, Python.
OVERHEAD_FRACTION = 0.05  # of the weight bytes
OVERHEAD_FIXED_BYTES = 512 * 2**20

# ---- the plan --------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """Memory needed by one model under one preset, and whether it fits on this machine."""

    model: str
    preset: str
    source_note: str
    dtype: str
    params_by_group: dict[str, int]
    bytes_by_group: dict[str, int]
    quantized_groups: tuple[str, ...]
    total_bytes: int  # weights under this preset where it runs natively
    fallback: str | None  # why the preset will not run natively here (e.g. mxfp4 dequantized to bf16)
    fallback_bytes: int | None  # weights as they will really load here when there is a fallback
    kv_bytes_per_1k_tokens: int
    kv_bytes: int
    context_tokens: int
    batch_size: int
    activation_bytes: int
    overhead_bytes: int
    placement: str  # "accelerator" | "cpu" | "offload"
    target: str  # device name, or "offload (cuda:0 -> cpu -> disk)"
    fits: dict[str, bool]  # per device name: would everything fit on that device alone?
    free_bytes: dict[str, int]
    fits_target: bool  # does it fit where this preset puts it?
    notes: list[str] = dataclasses.field(default_factory=list)
    # False when the numbers hold but this machine cannot load it (a missing package, no native mxfp4 to
    # quantize bf16 weights): planning for a machine you will rent still works; load() refuses with the reason.
    loadable_here: bool = True
    not_loadable_reason: str = ""
    # MXFP4 checkpoints: how the experts run here ("native kernels", "packed (workbench)", "dequantized"), the
    # packed path's expert cache budget, and what transformers alone would load where kernels are missing.
    mxfp4_path: str | None = None
    expert_cache_bytes: int = 0
    dequantized_bytes: int | None = None

    @property
    def total_params(self) -> int:
        return sum(self.params_by_group.values())

    @property
    def load_bytes(self) -> int:
        """The weight bytes that will really be allocated here."""
        return self.fallback_bytes if self.fallback_bytes is not None else self.total_bytes

    @property
    def need_bytes(self) -> int:
        """Weights as loaded here + KV cache + activations + overhead margin (+ the expert cache, if any)."""
        return self.load_bytes + self.kv_bytes + self.activation_bytes + self.overhead_bytes + self.expert_cache_bytes

    def require_loadable(self) -> Plan:
        """Return self when this machine can load the preset at all, else raise PresetError with the reason."""
        if not self.loadable_here:
            raise PresetError(self.not_loadable_reason)
        return self

    def require_fit(self) -> Plan:
        """Return self when the plan fits where the preset puts it, else raise DoesNotFitError."""
        if self.fits_target:
            return self
        free = sum(self.free_bytes.values()) if self.placement == "offload" else self.free_bytes.get(self.target, 0)
        raise DoesNotFitError(
            f"{self.model} with preset {self.preset!r} needs about {format_bytes(self.need_bytes)} on {self.target} "
            f"(weights {format_bytes(self.load_bytes)} + KV cache {format_bytes(self.kv_bytes)} for {self.context_tokens} tokens "
            f"x batch {self.batch_size} + activations {format_bytes(self.activation_bytes)} "
            f"+ overhead {format_bytes(self.overhead_bytes)}"
            + (f" + expert cache {format_bytes(self.expert_cache_bytes)}" if self.expert_cache_bytes else "") + ") "
            f"but only {format_bytes(free)} is free there.\n"
            "Try preset='offload' (accelerate spreads the weights over GPU, CPU RAM and disk; slow), a smaller preset "
            "(nf4 or int8; mxfp4 for gpt-oss on a GPU with native support), or fewer context_tokens. "
            "workbench.plan_all(model) compares every preset."
        )

    # ---- display -----------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for g in GROUPS:
            if self.params_by_group.get(g):
                how = "quantized" if g in self.quantized_groups else self.dtype
                rows.append((g, _count_str(self.params_by_group[g]), format_bytes(self.bytes_by_group[g]), how))
        return rows

    def _summary_lines(self) -> list[str]:
        lines = [f"weights: {format_bytes(self.total_bytes)} ({self.total_bytes / 2**30:.2f} GiB) "
                 f"for {_count_str(self.total_params)} parameters"]
        if self.fallback:
            lines.append(f"here it loads dequantized instead: {format_bytes(self.fallback_bytes)} ({self.fallback})")
        if self.dequantized_bytes is not None:
            lines.append(f"experts: {self.mxfp4_path}; transformers alone (no native kernels) would dequantize them "
                         f"to bf16: {format_bytes(self.dequantized_bytes)} (preset 'bf16' loads that)")
        if self.mxfp4_path == "packed (workbench)":  # what will run the expert matmuls (never compiles here)
            from workbench.model import mxfp4_kernel

            where = "cuda" if self.target.startswith("cuda") else "cpu"
            lines.append("expert matmuls: " + mxfp4_kernel.describe(where, cache=self.expert_cache_bytes > 0, build=False))
        if self.expert_cache_bytes:
            lines.append(f"expert cache (dequantized experts, least recently used evicted): up to "
                         f"{format_bytes(self.expert_cache_bytes)}")
        lines += [
            f"KV cache: {format_bytes(self.kv_bytes_per_1k_tokens)} per 1k tokens; {format_bytes(self.kv_bytes)} for "
            f"{self.context_tokens} tokens x batch {self.batch_size}",
            f"activations (one forward of {self.context_tokens} tokens): {format_bytes(self.activation_bytes)}; "
            f"overhead margin ({OVERHEAD_FRACTION:.0%} of weights + {OVERHEAD_FIXED_BYTES / 2**20:.0f} MiB): "
            f"{format_bytes(self.overhead_bytes)}",
            f"needs {format_bytes(self.need_bytes)} on {self.target}: " + ("fits" if self.fits_target else "DOES NOT FIT"),
            "free: " + ", ".join(f"{d} {format_bytes(b)}" + ("" if self.fits.get(d, True) else " (too small)")
                                 for d, b in self.free_bytes.items()),
        ]
        return lines

    def __str__(self) -> str:
        head = [f"Memory plan: {self.model}, preset {self.preset!r}", f"config: {self.source_note}"]
        table = [f"  {'group':<11}{'params':>10}{'bytes':>12}  stored as"]
        table += [f"  {g:<11}{n:>10}{b:>12}  {how}" for g, n, b, how in self._rows()]
        notes = [f"  - {n}" for n in self.notes]
        here = [] if self.loadable_here else [f"NOT LOADABLE HERE: {self.not_loadable_reason}"]
        return "\n".join(head + here + table + self._summary_lines() + (["notes:"] + notes if notes else []))

    def _repr_html_(self) -> str:
        e = html.escape
        rows = "".join(f"<tr><td>{e(g)}</td><td style='text-align:right'>{n}</td>"
                       f"<td style='text-align:right'>{b}</td><td>{e(how)}</td></tr>" for g, n, b, how in self._rows())
        summary = "".join(f"<li>{e(line)}</li>" for line in self._summary_lines())
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        return (
            f"<div><b>Memory plan: {e(self.model)}, preset <code>{e(self.preset)}</code></b>"
            f"<div style='font-size:90%'>config: {e(self.source_note)}</div>"
            + ("" if self.loadable_here else f"<div><b>not loadable here:</b> {e(self.not_loadable_reason)}</div>")
            + "<table><thead><tr><th>group</th><th>params</th><th>bytes</th><th>stored as</th></tr></thead>"
            f"<tbody>{rows}</tbody></table><ul>{summary}</ul>"
            + (f"<div>notes:</div><ul>{notes}</ul>" if notes else "") + "</div>"
        )


def _count_str(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


@dataclasses.dataclass
class PlanTable:
    """One plan per possible preset, and why the others are impossible."""

    plans: dict[str, Plan]
    skipped: dict[str, str]

    def __getitem__(self, preset: str) -> Plan:
        return self.plans[preset]

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(name, format_bytes(p.total_bytes) + (f" ({format_bytes(p.fallback_bytes)} here)" if p.fallback else
                                                      " (packed)" if p.dequantized_bytes is not None else ""),
                 format_bytes(p.need_bytes), p.target,
                 ("yes" if p.fits_target else "no") if p.loadable_here else "not loadable here")
                for name, p in self.plans.items()]

    def __str__(self) -> str:
        lines = [f"{'preset':<9}{'weights':<28}{'needs here':>11}  {'where':<28}fits"]
        lines += [f"{n:<9}{w:<28}{need:>11}  {t:<28}{f}" for n, w, need, t, f in self._rows()]
        lines += [f"{n}: not loadable here: {p.not_loadable_reason}" for n, p in self.plans.items() if not p.loadable_here]
        lines += [f"{n}: impossible: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        e = html.escape
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in self._rows())
        skipped = "".join(f"<li><code>{e(n)}</code>: {e(why)}</li>" for n, why in self.skipped.items())
        return ("<table><thead><tr><th>preset</th><th>weights</th><th>needs here</th><th>where</th><th>fits</th>"
                f"</tr></thead><tbody>{rows}</tbody></table>" + (f"<ul>{skipped}</ul>" if skipped else ""))
