"""Checks of user arguments, shared by the facade and the layers: each failure says what was wrong and what works.

One place for the rules a user meets everywhere (a dtype, token ids, an optional text, unknown keywords), so the same
mistake gets the same answer from `trace`, `chat`, `patch` or `steering_vector`, never a raw torch or template error.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

import torch

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16}


def float_dtype(value: Any, error: type[Exception], what: str = "dtype") -> torch.dtype | None:
    """None, a floating torch dtype, or its name ("float32", "bf16", ...) -> the dtype; else `error`."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[value.lower().removeprefix("torch.")]
    if isinstance(value, torch.dtype) and value.is_floating_point and value.itemsize in (2, 4):
        return value
    raise error(f"{what}={value!r}: choose torch.float32 (exact), torch.bfloat16 or torch.float16 (or their names "
                "'float32', 'bfloat16', 'float16'), or None for the default.")


def token_ids(ids: Iterable[int], vocab_size: int | None, error: type[Exception], where: str = "the input") -> list[int]:
    """Integer token ids within the vocabulary."""
    ids = list(ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise error(f"{where}: token ids must be integers, got {bad[0]!r}.")
    if vocab_size:
        out = [i for i in ids if not 0 <= i < vocab_size]
        if out:
            raise error(f"{where}: token id {out[0]} is outside the model's vocabulary (ids 0..{vocab_size - 1})"
                        f"{f'; {len(out)} ids are' if len(out) > 1 else ''}. Token ids come from this model's "
                        "tokenizer (s.tokenizer(text)['input_ids']), not another model's.")
    return ids


def optional_text(value: Any, name: str, error: type[Exception]) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise error(f"{name} must be a string (or None), not {type(value).__name__} {value!r:.60}.")


def unknown_keywords(given: dict, valid: Iterable[str], where: str, error: type[Exception]) -> None:
    """Refuse keywords `where` does not take, naming the near ones and every valid one."""
    if not given:
        return
    valid = sorted(valid)
    parts = []
    for key in given:
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    raise error(f"{where} got unknown keyword{'s' if len(parts) > 1 else ''} {', '.join(parts)}. It takes: "
                f"{', '.join(valid)}.")
