"""What every view shares: index checks with errors that name the valid range, token windows for long
traces, the colour scales, and the title/subtitle layout."""
from __future__ import annotations

import re

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
    if "attention" not in t.what or not t.attention_layers:
        raise ViewError("this trace has no attention: trace with what=['attention'] (plus anything else).")


def attention_layer(t, layer) -> int:
    need_attention(t)
    n = t.num_layers
    layers = t.attention_layers
    hint = f" (the model has layers 0..{n - 1}: trace with layers=[...] to capture others)" if len(layers) < n else ""
    return pick(layer, layers, "layer", "this trace's attention", hint, count=n)


def attention_head(t, head) -> int:
    return pick(head, t.heads, "head", "this trace's attention", count=t.num_heads)


def routing(t):
    """t.routing, or an error saying why there is none and how to get it."""
    if t.routing is not None:
        return t.routing
    name = t.model_name or "this model"
    if any(a.family == t.family and not a.is_moe for a in ADAPTERS):
        raise ViewError(f"this trace has no routing: {name} is a dense model (no experts to route to). "
                           f"Routing views need a mixture-of-experts model traced with what=['routing'].")
    raise ViewError("this trace has no routing: routing was not captured; trace with what=['routing'] "
                       "(plus anything else).")


def routing_layer(t, layer) -> int:
    """A model layer index that has routing, as the row into t.routing tensors."""
    r = routing(t)
    return r.layers.index(pick(layer, r.layers, "layer", "this trace's routing (MoE layers)",
                               count=t.num_layers))


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
    first of all what was active when trace `t` was taken (interventions, steering, hooks), if anything.
    Both are wrapped to a notebook's width (plotly never wraps a title: it cuts it at the figure's edge)."""
    notes = [n for n in (provenance_note(t), *notes) if n]
    head, sub = wrap([text], TITLE_SIZE), wrap(notes, SUBTITLE_SIZE)
    fig.update_layout(title=dict(text="<br>".join(head), subtitle=dict(text="<br>".join(sub)) if sub else None,
                                 x=0.0, xanchor="left", y=1.0, yanchor="top", pad=dict(t=14)),
                      margin=dict(t=title_margin(len(head), len(sub))))
    return fig


# Titles are wrapped to fit NOTEBOOK_WIDTH: JupyterLab's output area on a laptop with the file browser open.
# Plotly's title font is 1.4 x its 12 px default and the subtitle's 0.7 x that; an average character of the
# font (Open Sans) is about half an em wide.
NOTEBOOK_WIDTH = 800
TITLE_SIZE, SUBTITLE_SIZE = 17, 12


def wrap(parts: list[str], size: int = SUBTITLE_SIZE, width: int = NOTEBOOK_WIDTH) -> list[str]:
    """`parts` joined by " · " into lines that each fit `width` px at font `size`. A line breaks at a " · ",
    and inside a piece only when the piece is too long for a line of its own. HTML tags (<b>) take no room;
    a tag that spans lines is closed at the line's end and reopened on the next, so each line is well-formed."""
    limit = max(20, int((width - 10) / (size / 2)))  # characters per line

    def room(text: str) -> int:
        return len(re.sub(r"<[^>]+>", "", text))

    lines, line = [], ""
    for piece in (piece for part in parts for piece in part.split(" · ")):
        if not line or room(line) + 3 + room(piece) <= limit:
            line = f"{line} · {piece}" if line else piece
        elif room(piece) <= limit:
            lines.append(line)
            line = piece
        else:  # too long for a line of its own: it goes on here and is broken at spaces below
            line = f"{line} · {piece}"
        while room(line) > limit:  # too long even alone: break it at the last space that fits
            cut = max((k for k, ch in enumerate(line) if ch == " " and room(line[:k]) <= limit), default=None)
            if not cut:
                break
            lines.append(line[:cut])
            line = line[cut + 1:]
    if line:
        lines.append(line)
    return _balance_tags(lines)


def _balance_tags(lines: list[str]) -> list[str]:
    out, carried = [], []  # carried: tags open at the end of the previous line
    for line in lines:
        reopened = "".join(f"<{tag}>" for tag in carried)
        for closing, tag in re.findall(r"<(/?)(\w+)[^>]*>", line):
            if closing and tag in carried:
                carried.remove(tag)
            elif not closing and tag != "br":
                carried.append(tag)
        out.append(reopened + line + "".join(f"</{tag}>" for tag in reversed(carried)))
    return out


def title_margin(title_lines: int, subtitle_lines: int) -> int:
    """The top margin, px, that holds the title's and subtitle's lines (hung from the top of the figure)."""
    return max(60, 34 + 22 * title_lines + (6 + 16 * subtitle_lines if subtitle_lines else 0))


TOP_AXIS = 50  # px more top margin for an x axis drawn on top (its tick labels and title)


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
