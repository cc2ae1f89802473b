"""Readable token labels for figure axes.

Plotly puts categorical axis labels through as they are: a space-only token is invisible, a newline breaks
the tick, and two equal labels ("the", "the") collapse into ONE category (the second row silently lands on
the first). So every label here has its whitespace made visible and is unique.

    token_labels(t)                    # ['0 <|start|>', '1 us', ..., '12 ·the', '13 ⏎']
    token_labels(t, numbered=False)    # ['<|start|>', 'us', ..., '·the', '⏎']; repeats get their position
"""
from __future__ import annotations

from collections import Counter

# Whitespace and invisible characters -> a visible stand-in. Special tokens (<|start|>) are kept as they are.
VISIBLE = {" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽", "\u200b": "␣"}


def visible(text: str, limit: int | None = 24) -> str:
    """`text` with whitespace made visible (· space, ⏎ newline, ⇥ tab), "∅" if empty, cut to `limit` chars.

    Other control characters (byte-level tokenizers have tokens for \x00..\x1f) become their Unicode
    "control pictures" (␀, ␛): raw, they break the figure's JSON on its way to the browser.
    """
    out = "".join(VISIBLE.get(ch) or (ch if ch.isprintable() else _picture(ch)) for ch in text) or "∅"
    if limit is not None and len(out) > limit:
        out = out[:limit - 1] + "…"
    return out


def _picture(ch: str) -> str:
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # ␀..␟
    return "␡" if code == 0x7F else f"<U+{code:04X}>"


def _strings(tokens) -> list[str]:
    """Token strings of a Trace, a Tokens record, or a plain list of strings."""
    if hasattr(tokens, "tokens"):
        tokens = tokens.tokens
    if hasattr(tokens, "strings"):
        tokens = tokens.strings
    return list(tokens)


def token_labels(tokens, positions=None, *, numbered: bool = True, limit: int | None = 24) -> list[str]:
    """One unique, readable label per token: "12 ·the" (position, space, visible text).

    tokens: a Trace (or its `.tokens`, or a list of strings). positions: which tokens (default all), e.g.
    range(1744, 2000) for a window; positions in the labels stay those of the whole trace.
    numbered=False labels tokens by text alone and prefixes the position only where a text repeats.
    """
    strings = _strings(tokens)
    positions = range(len(strings)) if positions is None else list(positions)
    texts = [visible(strings[p], limit) for p in positions]
    if numbered:
        return [f"{p} {s}" for p, s in zip(positions, texts)]
    # visible() leaves no plain space in a text, so "12 ·the" can never equal another token's own text.
    repeats = Counter(texts)
    return [f"{p} {s}" if repeats[s] > 1 else s for p, s in zip(positions, texts)]
