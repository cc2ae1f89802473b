"""What every view shares: index checks with errors that name the valid range, token windows for long
traces, the colour scales, and the title/subtitle layout."""
from __future__ import annotations

import plotly.graph_objects as go

from workbench.errors import ViewError
from workbench.indices import format_indices, resolve_index
from workbench.model.adapters import ADAPTERS

CaptureError = ViewError  # views raise ViewError (a CaptureError: what the trace holds does not allow it)

# One colour language across views: probabilities and weights in blue on a fixed 0..1 range (so two
# figures can be compared by eye), entropies in viridis from 0 bits, counts in blue from 0.
PROBABILITY = dict(colorscale="Blues", zmin=0.0, zmax=1.0)
ENTROPY = dict(colorscale="Viridis", zmin=0.0)
COUNT = dict(colorscale="Blues", zmin=0.0)

MAX_TOKENS = 256  # token axes longer than this are windowed (last MAX_TOKENS by default)


def span(xs: list[int]) -> str:
    """[0, 1, 2, 3] -> '0..3'; [0, 2] -> '0, 2'."""
    return format_indices(xs)


def pick(value, valid: list[int], what: str, where: str, hint: str = "", count: int | None = None) -> int:
    """`value` if it is one of `valid` (negative values count from `count`, the model's total), else a
    ViewError naming them."""
    return resolve_index(value, valid, what, where, ViewError, hint, count=count)


def need_attention(t) -> None:
    if "attention" not in t.meta["what"] or not t.attention_layers:
        raise ViewError("this trace has no attention: trace with what=['attention'] (plus anything else).")


def attention_layer(t, layer) -> int:
    need_attention(t)
    n = t.meta["num_layers"]
    layers = t.attention_layers
    hint = f" (the model has layers 0..{n - 1}: trace with layers=[...] to capture others)" if len(layers) < n else ""
    return pick(layer, layers, "layer", "this trace's attention", hint, count=n)


def attention_head(t, head) -> int:
    return pick(head, t.heads, "head", "this trace's attention", count=t.meta["num_heads"])


def routing(t):
    """t.routing, or an error saying why there is none and how to get it."""
    if t.routing is not None:
        return t.routing
    name = t.meta.get("model") or "this model"
    if any(a.family == t.meta.get("family") and not a.is_moe for a in ADAPTERS):
        raise ViewError(f"this trace has no routing: {name} is a dense model (no experts to route to). "
                           f"Routing views need a mixture-of-experts model traced with what=['routing'].")
    raise ViewError("this trace has no routing: routing was not captured; trace with what=['routing'] "
                       "(plus anything else).")


def routing_layer(t, layer) -> int:
    """A model layer index that has routing, as the row into t.routing tensors."""
    r = routing(t)
    return r.layers.index(pick(layer, r.layers, "layer", "this trace's routing (MoE layers)",
                               count=t.meta["num_layers"]))


def num_experts(t) -> int:
    return int(routing(t).logits.shape[-1])


def window(n: int, window=None, default: int = MAX_TOKENS, unit: str = "tokens") -> tuple[int, int, str]:
    """(start, stop, note) of the token positions to show out of `n`.

    window: None (everything up to `default` tokens, else the last `default`), an int w (the last w), or
    (start, stop) as in a slice. note is "" when everything is shown, else "showing tokens 1744–1999 of 2000".
    """
    if window is None:
        start, stop = max(0, n - default), n
    elif isinstance(window, int) and not isinstance(window, bool):
        if window < 1:
            raise ViewError(f"window={window}: give a positive number of {unit} (or a (start, stop) pair).")
        start, stop = max(0, n - window), n
    else:
        try:
            start, stop = (int(v) for v in window)
        except (TypeError, ValueError):
            raise ViewError(f"window={window!r}: give a number of {unit} or a (start, stop) pair.") from None
        start, stop, _ = slice(start, stop).indices(n)
        if stop <= start:
            raise ViewError(f"window={window!r} selects no {unit}: this trace has {unit} 0..{n - 1}.")
    note = "" if (start, stop) == (0, n) else f"showing {unit} {start}–{stop - 1} of {n}"
    return start, stop, note


def title(fig: go.Figure, t, text: str, *notes: str) -> go.Figure:
    """Set the title; non-empty notes go underneath as a subtitle (what is windowed, how to read it), and
    first of all what was active when trace `t` was taken (interventions, steering, hooks), if anything."""
    sub = " · ".join(n for n in (provenance_note(t), *notes) if n)
    fig.update_layout(title=dict(text=text, subtitle=dict(text=sub) if sub else None, x=0.0, xanchor="left"),
                      margin=dict(t=90 if sub else 60))
    return fig


def provenance_note(t) -> str:
    """"taken with ablate_experts {...}; steer ..." for a trace taken inside interventions, else ""."""
    active = getattr(t, "provenance", None) or []
    if not active:
        return ""
    parts = [p["name"] + (f" {p['spec']}" if "spec" in p else "") for p in active]
    return "<b>taken with " + "; ".join(parts) + "</b>"


def axis_height(rows: int, lo: int = 420, hi: int = 900, per_row: int = 14) -> int:
    """A figure height that gives each categorical row room for its label, within [lo, hi] pixels."""
    return max(lo, min(hi, 160 + per_row * rows))
