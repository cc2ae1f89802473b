"""What a quantization preset changes: routing and next-token distributions against a reference preset.

    r = compare_presets("openai/gpt-oss-20b", ["bf16", "mxfp4"], texts)
    r = compare_presets({"bf16": "unsloth/gpt-oss-20b-BF16", "mxfp4": "openai/gpt-oss-20b",
                         "nf4": "unsloth/gpt-oss-20b-BF16"}, texts=texts)   # {preset: checkpoint}
    print(r)                               # one row per preset: KL, top-1 agreement, routing agreement
    r.per_layer["nf4"]["jaccard"]          # per routed layer, for a plot (r.figure())
    r.reports["mxfp4"].fallback            # what really loaded (e.g. mxfp4 dequantized to bf16 on the CPU)

`model` is one checkpoint for every preset, or a {preset: checkpoint} mapping: the released gpt-oss-20b is
stored in MXFP4, which bitsandbytes presets refuse, so nf4/int8 need a bf16 copy of the same weights. All
checkpoints must share the config (tracing.config_hash ignores dtype and quantization) and the tokenizer:
every preset reads the same token ids, tokenized once by the first one loaded.

Presets are loaded one at a time, the reference first: its next-token log-probs (float32, CPU, every
position of every text: tokens x vocab x 4 bytes, e.g. 8 texts x 128 tokens of gpt-oss's 201k vocab =
0.8 GB) and routing stay in memory; every other preset is compared as it runs, then freed (del,
gc.collect, torch.cuda.empty_cache) before the next loads. Peak memory: the largest preset plus that.

Metrics are means over all tokens of all texts (a long text weighs more than a short one):
- routing, per routed layer: top-1 agreement (same first expert) and Jaccard |A∩B|/|A∪B| of the top-k sets;
- next token: KL(reference || preset) in nats (mean and max over tokens) and top-1 agreement of the logits.
A preset that cannot load (e.g. int8 on the MXFP4 checkpoint) is listed in `skipped` with the reason.
"""
from __future__ import annotations

import dataclasses
import gc
import html
from typing import Any, Mapping, Sequence

import torch

from workbench import metrics
from workbench.errors import PresetComparisonError
from workbench.inspect.routing import routed_forward
from workbench.inspect.spec import config_hash
from workbench.metrics import kl_divergence
from workbench.model import loading
from workbench.model.adapters import input_device

DEFAULT_PRESETS = ("bf16", "mxfp4", "nf4")


@dataclasses.dataclass
class PresetComparison:
    reference: str
    presets: list[str]  # compared, reference first
    skipped: dict[str, str]  # preset -> why it could not load
    reports: dict[str, Any]  # preset -> LoadReport
    texts: int
    tokens: int
    layers: list[int]  # routed layers (empty for a dense model)
    per_layer: dict[str, dict[str, list[float]]]  # preset -> {"layer", "top1_agreement", "jaccard"}
    summary: dict[str, dict[str, float]]  # preset -> kl_mean, kl_max, top1_logits, routing_top1, jaccard
    notes: list[str] = dataclasses.field(default_factory=list)

    def rows(self) -> list[dict]:
        out = []
        for p in self.presets:
            r, s = self.reports[p], self.summary[p]
            dtypes = sorted({d for group in r.dtypes_by_group.values() for d in group if d != "float32"})
            loaded = r.actual_quantization or ", ".join(dtypes) or "float32"
            out.append({"preset": p + (" (reference)" if p == self.reference else ""),
                        "loaded": loaded + (" (fallback)" if r.fallback else ""), **s})
        return out

    def table(self) -> str:
        head = ["preset", "loaded", "KL mean", "KL max", "top-1 next", "routing top-1", "Jaccard"]
        rows = [[r["preset"], r["loaded"], f"{r['kl_mean']:.4g}", f"{r['kl_max']:.4g}", f"{r['top1_logits']:.1%}",
                 _pct(r["routing_top1"]), _pct(r["jaccard"])] for r in self.rows()]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head)] + [line(r) for r in rows])

    def __str__(self) -> str:
        lines = [f"{self.texts} texts, {self.tokens} tokens; KL(reference || preset) in nats, means over tokens",
                 self.table()]
        lines += [f"skipped {p}: {why}" for p, why in self.skipped.items()]
        lines += [f"{p}: {self.reports[p].fallback}" for p in self.presets if self.reports[p].fallback]
        return "\n".join(lines + self.notes)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("preset", "loaded", "KL mean", "KL max", "top-1 next",
                                                   "routing top-1", "Jaccard"))
        body = "".join(
            f"<tr><td><b>{html.escape(r['preset'])}</b></td><td>{html.escape(r['loaded'])}</td>"
            f"<td>{r['kl_mean']:.4g}</td><td>{r['kl_max']:.4g}</td><td>{r['top1_logits']:.1%}</td>"
            f"<td>{_pct(r['routing_top1'])}</td><td>{_pct(r['jaccard'])}</td></tr>" for r in self.rows())
        extra = [f"skipped <b>{html.escape(p)}</b>: {html.escape(w)}" for p, w in self.skipped.items()]
        extra += [f"{html.escape(p)}: {html.escape(self.reports[p].fallback)}" for p in self.presets
                  if self.reports[p].fallback]
        notes = "".join(f"<li>{x}</li>" for x in extra + [html.escape(n) for n in self.notes])
        return (f"<p>{self.texts} texts, {self.tokens} tokens · KL(reference ‖ preset) in nats</p>"
                f"<table><tr>{head}</tr>{body}</table>" + (f"<ul>{notes}</ul>" if notes else ""))

    def figure(self):
        """Plotly: routing top-1 agreement and Jaccard with the reference, per routed layer, one line a preset."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for p in self.presets[1:]:
            d = self.per_layer[p]
            fig.add_scatter(x=d["layer"], y=d["top1_agreement"], mode="lines+markers", name=f"{p} top-1")
            fig.add_scatter(x=d["layer"], y=d["jaccard"], mode="lines+markers", name=f"{p} Jaccard",
                            line=dict(dash="dot"))
        fig.update_layout(title=f"Routing agreement with {self.reference}", xaxis_title="layer",
                          yaxis=dict(title="agreement", range=[0, 1.02]))
        return fig


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _forward(session, ids: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per text: next-token log-probs [T, vocab] float32 on the CPU and routing indices [layers, T, k]."""
    model, adapter = session.model, session.adapter
    device = input_device(model)
    out = []
    for x in ids:
        input_ids = torch.tensor([x], dtype=torch.int64, device=device)
        out_, routed = routed_forward(model, adapter, input_ids=input_ids, use_cache=False)
        logits = out_.logits
        routing = torch.stack([routed[layer].indices.cpu() for layer in sorted(routed)]) if adapter.is_moe else None
        out.append((torch.log_softmax(logits[0].float(), dim=-1).cpu(), routing))
    return out


def compare_presets(model, presets: Sequence[str] | None = None, texts: Sequence[str] = (), *,
                    max_tokens: int = 128, reference: str | None = None, **load_kwargs) -> PresetComparison:
    """Load each preset in turn, run `texts`, and compare its routing and next-token log-probs with the reference's.

    model: a hub id / folder for every preset, or {preset: hub id or folder}. presets: default the mapping's
    keys, else bf16, mxfp4, nf4. reference: default the first preset that loads. load_kwargs go to `load`.
    """
    if isinstance(model, Mapping):
        presets = list(presets if presets is not None else model)
        missing = [p for p in presets if p not in model]
        if missing:
            raise PresetComparisonError(f"no checkpoint given for presets {missing} in the {{preset: model}} mapping.")
        sources = dict(model)
    else:
        presets = list(presets if presets is not None else DEFAULT_PRESETS)
        sources = {p: model for p in presets}
    if isinstance(texts, str) or not texts:
        raise PresetComparisonError("texts must be a non-empty list of strings.")
    if reference is not None and reference not in presets:
        raise PresetComparisonError(f"reference {reference!r} is not among the presets {presets}.")
    order = ([reference] if reference else []) + [p for p in presets if p != reference]

    ids = ref = ref_hash = None
    skipped, reports, layers, per_layer, summary, notes = {}, {}, [], {}, {}, []
    for preset in order:
        try:
            session = loading.load_model(sources[preset], preset, **load_kwargs)
        except Exception as e:  # any failure to load makes the preset impossible here: say why, go on
            if preset == reference:
                raise
            skipped[preset] = f"{type(e).__name__}: {e}"
            _free()
            continue
        reports[preset] = session.report
        h = config_hash(session.model.config)
        if ids is None:
            ids = [session.tokenizer(t)["input_ids"][:max_tokens] for t in texts]
            if not all(ids):
                raise PresetComparisonError("a text has no tokens: every text must give at least one token.")
            ref_hash = h
            layers = [i for i in session.adapter.moe_layers(session.model)]
        elif h != ref_hash:
            raise PresetComparisonError(f"{sources[preset]!r} ({preset}) is not the same model as the reference "
                                        f"{sources[order[0]]!r}: their configs differ (beyond dtype/quantization).")
        results = _forward(session, ids)
        del session  # the last reference to the model: freed before the next preset loads
        _free()
        if ref is None:
            ref, reference = results, preset
            if reference != order[0]:
                notes.append(f"reference: {preset} ({order[0]} could not load)")
        per_layer[preset], summary[preset] = _against(ref, results, layers)
        del results
    if ref is None:
        raise PresetComparisonError("no preset could load:\n" + "\n".join(f"  {p}: {w}" for p, w in skipped.items()))
    compared = [p for p in order if p in summary]
    return PresetComparison(reference=reference, presets=compared, skipped=skipped, reports=reports, texts=len(ids),
                            tokens=sum(map(len, ids)), layers=layers, per_layer=per_layer, summary=summary,
                            notes=notes)


def _against(ref, results, layers) -> tuple[dict, dict]:
    """Per-layer routing agreement and next-token KL / top-1 agreement of `results` with `ref`, over all tokens."""
    top1 = torch.zeros(len(layers), dtype=torch.float64)
    jaccard = torch.zeros(len(layers), dtype=torch.float64)
    kl_sum, kl_max, same_next, tokens = 0.0, 0.0, 0, 0
    for (ref_logp, ref_route), (logp, route) in zip(ref, results):
        kl = kl_divergence(ref_logp, logp)  # [T] KL(ref || preset), nats; 0 where the reference gives p = 0
        kl_sum += float(kl.double().sum())
        kl_max = max(kl_max, float(kl.max()))
        same_next += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        tokens += len(kl)
        if ref_route is not None:
            top1 += (ref_route[..., 0] == route[..., 0]).double().sum(-1)
            jaccard += metrics.jaccard(ref_route, route).sum(-1)  # [L]
    per_layer = {"layer": list(layers), "top1_agreement": (top1 / tokens).tolist(),
                 "jaccard": (jaccard / tokens).tolist()}
    summary = {"kl_mean": kl_sum / tokens, "kl_max": kl_max, "top1_logits": same_next / tokens,
               "routing_top1": float(top1.mean() / tokens) if layers else None,
               "jaccard": float(jaccard.mean() / tokens) if layers else None}
    return per_layer, summary
