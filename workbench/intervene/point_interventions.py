"""Interventions addressed by hook point name (workbench/inspect/points.py): read, set, zero or mean-ablate any point.

    with s.hook("blocks.3.attn.z", fn):              # fn(value, hook) -> None (read) or a replacement
    with s.set("blocks.2.resid_post", vector):       # a value broadcast over the point (e.g. [d_model])
    with s.set("blocks.*.mlp.experts.3.out", fn):    # a function of the value; patterns allowed
    with s.ablate("blocks.1.mlp.out"):               # zero-ablation
    with s.ablate("blocks.1.attn.z", mode="mean", reference=texts):   # the mean over a reference corpus

Values are given in the per-sequence shape traces use (README, 'Hook points'), without the batch dimension, and are
broadcast over the live tensor (which has one). A mean ablation uses the mean over every token of the reference
texts (over every routed row for an expert point), traced once when the `with` is entered.
"""
from __future__ import annotations

import torch

from workbench.errors import HookPointError, InterventionError
from workbench.inspect.points import HookPoint, PointSpace
from workbench.inspect.taps import Taps
from workbench.intervene.interventions import Intervention

MODES = ("zero", "mean")


class _PointIntervention(Intervention):
    example = '"blocks.3.resid_post"'

    def _check(self, spec):
        names = spec["at"]
        space = PointSpace.of(self.model, self.adapter)
        try:
            points = space.resolve(names)
        except HookPointError as e:
            raise InterventionError(str(e)) from e
        for p in points:
            if not p.kind.settable and self.changes:
                raise InterventionError(f"{p.name} cannot be changed: {p.kind.why_not}.")
        self.points = points
        return {"at": [p.name for p in points]}

    changes = True

    def _fn(self, point: HookPoint):
        raise NotImplementedError

    def _install(self) -> None:
        taps = Taps(self.model, self.adapter, [(p, self._fn(p)) for p in self.points],
                    preset=getattr(getattr(self.session, "report", None), "preset", None))
        try:
            taps.__enter__()
        except HookPointError as e:
            raise InterventionError(str(e)) from e
        self._undo.append(lambda: taps.__exit__(None, None, None))


class tap(_PointIntervention):
    """`with tap(s, "blocks.3.attn.z", fn):` fn(value, hook) at that point (patterns too); a non-None return
    value replaces it (where the point can be changed)."""

    name = "hook"

    def __init__(self, session, at, fn):
        if not callable(fn):
            raise InterventionError(f"hook needs a function fn(value, hook), not {fn!r}.")
        self.fn = fn
        self.changes = False  # reading is allowed everywhere; a replacement at a read-only point is ignored there
        super().__init__(session, {"at": at})

    def _fn(self, point):
        return self.fn

    def describe(self) -> dict:
        return {"name": self.name, "at": self.spec["at"], "fn": getattr(self.fn, "__qualname__", repr(self.fn))}


class set_point(_PointIntervention):
    """`with set_point(s, name, value_or_fn):` the point's value replaced by a tensor (broadcast) or fn(value, hook)."""

    name = "set"

    def __init__(self, session, at, value):
        if not (callable(value) or isinstance(value, (torch.Tensor, int, float))):
            raise InterventionError(f"set takes a tensor, a number or a function fn(value, hook) -> tensor, "
                                    f"not {type(value).__name__}.")
        self.value = value
        super().__init__(session, {"at": at})

    def _fn(self, point):
        value = self.value
        if callable(value):
            return value

        def fn(x, hook):
            v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
            try:
                return torch.broadcast_to(v, x.shape).clone()
            except RuntimeError:
                raise InterventionError(f"a value of shape {tuple(v.shape)} does not broadcast over {hook.name}, "
                                        f"whose live shape is {tuple(x.shape)} (give it without the batch "
                                        "dimension, e.g. [d_model])") from None
        return fn

    def describe(self) -> dict:
        v = self.value
        what = getattr(v, "__qualname__", None) if callable(v) else (
            f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else v)
        return {"name": self.name, "at": self.spec["at"], "value": what}


class ablate_point(_PointIntervention):
    """`with ablate_point(s, name, mode="zero" | "mean", reference=texts):` zero or mean ablation of a point."""

    name = "ablate"

    def __init__(self, session, at, mode: str = "zero", reference=None):
        if mode not in MODES:
            raise InterventionError(f"mode={mode!r}: choose 'zero' or 'mean' (mean needs reference=texts).")
        if mode == "mean" and not reference:
            raise InterventionError("mode='mean' needs reference=[texts...]: the mean is taken over their tokens.")
        if mode == "zero" and reference is not None:
            raise InterventionError("reference= is for mode='mean'; a zero-ablation needs none.")
        self.mode, self.reference, self.means = mode, reference, {}
        super().__init__(session, {"at": at})

    def _install(self) -> None:
        if self.mode == "mean" and not self.means:
            self.means = self._means()
        super()._install()

    def _means(self) -> dict[str, torch.Tensor]:
        texts = [self.reference] if isinstance(self.reference, str) else list(self.reference)
        names = [p.name for p in self.points]
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for text in texts:
            t = self.session.trace(text, what=names, budget=None)
            for p in self.points:
                x = t[p.name].float()
                if p.key in ("attn.q", "attn.k", "attn.v"):  # [heads, T, d]: over tokens
                    s, n = x.sum(dim=1), x.shape[1]
                else:  # [T, ...] or [rows, ...]
                    s, n = x.sum(dim=0), x.shape[0]
                sums[p.name] = sums.get(p.name, 0) + s
                counts[p.name] = counts.get(p.name, 0) + n
        out = {}
        for p in self.points:
            if not counts.get(p.name):
                raise InterventionError(f"the reference texts never reach {p.name} (no token was routed to that "
                                        "expert): give other texts, or use mode='zero'.")
            mean = sums[p.name] / counts[p.name]
            out[p.name] = mean.unsqueeze(1) if p.key in ("attn.q", "attn.k", "attn.v") else mean
        return out

    def _fn(self, point):
        if self.mode == "zero":
            return lambda x, hook: torch.zeros_like(x)
        mean = self.means[point.name]
        return lambda x, hook: torch.broadcast_to(mean.to(x.device, x.dtype), x.shape).clone()

    def describe(self) -> dict:
        d = {"name": self.name, "at": self.spec["at"], "mode": self.mode}
        if self.mode == "mean":
            d["reference"] = len([self.reference] if isinstance(self.reference, str) else self.reference)
        return d
