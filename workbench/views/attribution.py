"""Direct logit attribution as figures (the Attribution that `s.attribute(...)` returns).

    attribution_bars(a, n=20)             # the n largest contributions, ranked, positive blue, negative red
    attribution_heatmap(a, of="heads")    # layers x heads; of="experts": layers x experts (MoE layers)
    attribution_figure(a, kind="bars")    # one of the above by name: what a.figure(kind) calls

Both read only the Attribution's public fields and say in the subtitle that the final norm's scale was
frozen (the approximation that makes the decomposition linear).
"""
from __future__ import annotations

import plotly.graph_objects as go

from workbench.errors import ViewError
from workbench.views import _common as c
from workbench.views.labels import visible

POSITIVE, NEGATIVE = "#4a7fb5", "#c0504d"
OF = ("heads", "experts")
KINDS = ("bars",) + OF


def _title(fig: go.Figure, a, what: str) -> go.Figure:
    text = (f"{what}: logit of {visible(a.target_token, 20)} (id {a.target}) at position {a.position} "
            f"({visible(a.position_token, 16)}) = {a.logit:.3f}")
    sub = f"sum of {len(a.labels)} terms {a.total:.3f} · {a.approximation}"
    head, sub = c.wrap([text], c.TITLE_SIZE), c.wrap([sub])  # wrapped to a notebook's width
    fig.update_layout(title=dict(text="<br>".join(head), subtitle=dict(text="<br>".join(sub)), x=0.0, xanchor="left"),
                      margin=dict(t=c.title_margin(len(head), len(sub)), l=10, r=10, b=40), template="plotly_white")
    return fig


def attribution_bars(a, n: int = 20) -> go.Figure:
    """Horizontal bars of the n contributions largest in absolute value, the largest on top."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ViewError(f"n={n!r}: give how many contributions to show (1 or more).")
    top = a.top(n)[::-1]  # plotly draws the first bar at the bottom
    labels, values = [label for label, _ in top], [value for _, value in top]
    kinds = dict(zip(a.labels, a.kinds))
    fig = go.Figure(go.Bar(
        x=values, y=labels, orientation="h", marker_color=[POSITIVE if v >= 0 else NEGATIVE for v in values],
        customdata=[kinds[label] for label in labels],
        hovertemplate="%{y} (%{customdata}): %{x:+.4f}<extra></extra>"))
    fig.update_layout(height=max(260, 110 + 22 * len(top)), xaxis_title="contribution to the logit",
                      yaxis=dict(automargin=True))
    return _title(fig, a, f"top {len(top)} contributions")


def attribution_heatmap(a, of: str = "heads") -> go.Figure:
    """Layers x heads (of="heads") or layers x experts (of="experts", MoE layers only; experts a token was
    not routed to are blank), coloured by contribution with 0 white."""
    if of not in OF:
        raise ViewError(f"of={of!r}: choose one of {', '.join(map(repr, OF))}.")
    if of == "heads":
        z, rows, what = a.heads.tolist(), list(range(a.heads.shape[0])), "head"
    else:
        if a.experts is None or not a.moe_layers:
            raise ViewError("this model has no experts (a dense model): use of='heads', or attribution_bars(a) "
                            "for the MLPs.")
        chosen = {(layer, e) for layer, e, kind in zip(a.layers, a.indices, a.kinds) if kind == "expert"}
        rows, what = a.moe_layers, "expert"
        z = [[float(a.experts[layer, e]) if (layer, e) in chosen else None for e in range(a.experts.shape[1])]
             for layer in rows]
    limit = max((abs(v) for row in z for v in row if v is not None), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(len(z[0]) if z else 0)), y=[f"layer {layer}" for layer in rows], colorscale="RdBu",
        zmid=0.0, zmin=-limit, zmax=limit, hovertemplate=f"%{{y}}, {what} %{{x}}: %{{z:+.4f}}<extra></extra>",
        colorbar=dict(title="logit")))
    fig.update_layout(height=max(260, 120 + 16 * len(rows)), xaxis_title=what, yaxis=dict(autorange="reversed"))
    return _title(fig, a, f"contribution of each {what}")


def attribution_figure(a, kind: str = "bars", n: int = 20) -> go.Figure:
    """kind "bars": attribution_bars(a, n); "heads" or "experts": attribution_heatmap(a, kind)."""
    if kind not in KINDS:
        raise ViewError(f"kind={kind!r}: choose one of {', '.join(map(repr, KINDS))}.")
    return attribution_bars(a, n) if kind == "bars" else attribution_heatmap(a, kind)
