"""Layer, head and expert indices: one rule everywhere and one way to print them.

The rule: an index names a model layer (head, expert), and a negative one counts from the end of the
model's (-1 = the last layer), whatever subset a trace or an intervention holds.
"""
from __future__ import annotations

import operator


def format_indices(xs) -> str:
    """[0, 1, 2, 3] -> '0..3'; [0, 2] -> '0, 2'."""
    xs = list(xs)
    if len(xs) > 2 and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}"
    return ", ".join(map(str, xs))


def as_integer(value, error) -> int:
    """`value` as an int (numpy integers from widgets too), never a bool; otherwise raises `error()`, a
    callable so its message is only built when it is needed."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise error() from None


def resolve_index(value, valid, what: str, where: str, error: type[Exception] = ValueError, hint: str = "",
                  count: int | None = None, context: str = "") -> int:
    """`value` if it is one of `valid`, else `error` naming the valid ones. A negative value counts from
    `count` (the model's number of layers/heads/experts), or from the end of `valid` without it.
    Integers only (numpy integers from widgets too), never bools. `context` follows the value in messages
    ("expert 9 (layer 0) out of range: this model has experts 0..7")."""
    valid = list(valid)
    value = as_integer(value, lambda: error(f"{what} must be an integer, not {value!r}: {where} has {what}s "
                                            f"{format_indices(valid)}."))
    if value < 0 and count is not None and -count <= value:
        value += count
    elif value < 0 and count is None and -len(valid) <= value:
        value = valid[value]
    if value not in valid:
        raise error(f"{what} {value}{context} is out of range: {where} has {what}s {format_indices(valid)}{hint}.")
    return value


def resolve_indices(requested, count: int, what: str, where: str = "the model",
                    error: type[Exception] = ValueError) -> list[int]:
    """None -> all of range(count); an int or a list of ints -> sorted, checked, non-negative indices."""
    if requested is None:
        return list(range(count))
    items = [requested] if not isinstance(requested, (list, tuple, set, range)) else list(requested)
    return sorted({resolve_index(i, range(count), what, where, error, count=count) for i in items})
