"""Activation patching as a heatmap: layers x sites, how much of the clean behaviour each patched site restores.

    patching_heatmap(r)                   # normalised scores: 0 = no effect, 1 = the clean metric
    patching_heatmap(r, value="metric")   # the metric itself

Diverging colours centred at 0 (red: towards clean, blue: away from it), on a range symmetric around 0 so the
sign reads at a glance. Positions are labelled by their clean token; where the corrupt token differs, both
("3 ·John→·Mary").
"""
from __future__ import annotations

import math

import plotly.graph_objects as go

from workbench.errors import ViewError
from workbench.views import _common as c
from workbench.views.labels import visible

VALUES = ("normalized", "metric")


def site_labels(r) -> list[str]:
    """Unique, readable column labels: "3 ·Mary" per position (clean→corrupt where they differ), else the sites."""
    if r.at not in ("residual", "mlp"):
        return list(r.sites)
    out = []
    for p, (a, b) in enumerate(zip(r.clean_tokens, r.corrupt_tokens)):
        out.append(f"{p} {visible(a, 16)}" + ("" if a == b else f"→{visible(b, 16)}"))
    return out


def patching_heatmap(r, value: str = "normalized") -> go.Figure:
    """Layers x sites heatmap of a PatchingResult (`s.patch(...)`)."""
    if value not in VALUES:
        raise ViewError(f"value={value!r}: choose one of {', '.join(map(repr, VALUES))}.")
    flat = r.clean == r.corrupt
    if value == "normalized" and flat:
        value = "metric"  # the normalised score is undefined (0/0) when clean and corrupt agree
    z = (r.normalized if value == "normalized" else r.scores).float()
    other = r.scores if value == "normalized" else r.normalized
    bound = float(z.abs().nan_to_num(0.0).max()) or 1.0
    if not math.isfinite(bound):
        raise ViewError(f"the {value} scores are not all finite: check the metric.")
    if value == "normalized":
        bound = max(bound, 1.0)  # 1 (fully restored) is always on the scale
    x = site_labels(r)
    y = [f"layer {layer}" for layer in r.layers]
    unit = {"residual": "position", "mlp": "position", "attention_heads": "head", "experts": "expert"}.get(r.at, "site")
    other_name = "metric" if value == "normalized" else "normalised"
    fig = go.Figure(go.Heatmap(
        z=z.numpy(), x=x, y=y, customdata=other.numpy(), colorscale="RdBu_r", zmid=0.0, zmin=-bound, zmax=bound,
        colorbar=dict(title="normalised" if value == "normalized" else "metric"),
        hovertemplate=f"%{{y}}<br>{unit} %{{x}}<br>{value} = %{{z:.4f}}<br>{other_name} = %{{customdata:.4f}}"
                      "<extra></extra>"))
    fig.update_xaxes(title=unit, type="category", side="top")
    fig.update_yaxes(title="layer", type="category", autorange="reversed")
    what = {"residual": "residual stream (decoder layer output)", "mlp": "MLP output",
            "attention_heads": "attention heads (all positions)", "experts": "router logit per expert (all positions)"}
    how = ("1 = patching that site alone gives the clean metric, 0 = no change from corrupt" if value == "normalized"
           else f"clean {r.clean:.4g}, corrupt {r.corrupt:.4g}" + (" (equal: no normalised score)" if flat else ""))
    method = "Attribution patching (estimated)" if getattr(r, "method", "") == "attribution" else "Activation patching"
    c.title(fig, None, f"{method} · {what.get(r.at, r.at)} · {r.metric_name}", how)
    # No fixed width: the figure takes the notebook's width (a fixed 1,600 px pushed the columns that light up
    # off-screen in JupyterLab); narrow it with r.figure().update_xaxes(range=...) to zoom on positions.
    fig.update_layout(height=c.axis_height(len(y)), margin=dict(t=fig.layout.margin.t + c.TOP_AXIS))  # x axis on top
    return fig
