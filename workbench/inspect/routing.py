"""The router-logits primitive: what each routed MLP's router computed, as the model applied it.

Everything that reads or changes routing goes through here, so there is one way to say "what the model
applied": the capture (traces), corpus statistics, comparisons, and the interventions that change routing.

- Reading: a forward pre-hook on a routed MLP takes its input and recomputes the router logits with the
  router's own arithmetic (`F.linear(x, weight, bias)`, same dtype and device), applies the active logit
  transforms, and derives experts and weights with `adapter.route`. This works on every preset: under
  mxfp4 transformers' MLP computes the logits itself and never calls the router module, so hooks on the
  router would never fire.
- Changing: a `LogitTransform` registered on a routed MLP changes its router logits. The MLP's forward is
  wrapped, for as long as a transform is registered, in a TorchFunctionMode that intercepts the one
  `F.linear` whose weight is the router's weight and applies the transforms to its result. That is the
  router's computation on every path (inside the router module, and inside `Mxfp4GptOssMLP.forward`).
  The reading side applies the same transforms, so a trace taken inside an intervention records what the
  model really used.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from workbench.errors import InterventionError
from workbench.model import compat
from workbench.model.adapters import Adapter, text_config

_TRANSFORMS = "_workbench_router_transforms"  # attribute of a routed MLP: the active logit transforms
_OVERRIDES = "_workbench_route_overrides"  # attribute of a routed MLP: fn(x, indices, weights) -> (indices, weights)
_MISSING = object()


# ---- changing router logits ------------------------------------------------------------------------
class LogitTransform:
    """One change to a layer's router logits: `fn(logits [tokens, experts]) -> logits`, out of place."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], blocked: set[int], label: str):
        self.fn, self.blocked, self.label = fn, frozenset(blocked), label  # blocked: experts set to -inf

    def __repr__(self) -> str:
        return f"LogitTransform({self.label})"


def router_transforms(mlp: nn.Module) -> list[LogitTransform]:
    """The routing transforms active on a routed MLP, outermost first (empty outside interventions)."""
    return list(mlp.__dict__.get(_TRANSFORMS, ()))


def transform_router_logits(mlp: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Router logits as the active transforms change them (the same tensor when there are none)."""
    for t in mlp.__dict__.get(_TRANSFORMS, ()):
        logits = t.fn(logits)
    return logits


class _RouterLogits(TorchFunctionMode):
    """While an MLP runs: apply its transforms to the result of F.linear(x, router.weight, ...)."""

    def __init__(self, mlp: nn.Module, router: nn.Module):
        super().__init__()
        self.mlp, self.router, self.applied = mlp, router, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is getattr(self.router, "weight", None):  # looked up now: offloading may swap it
                out = transform_router_logits(self.mlp, out)
                self.applied += 1
        return out


def add_router_transform(mlp: nn.Module, router: nn.Module, transform: LogitTransform) -> Callable[[], None]:
    """Register `transform` on `mlp` (wrapping its forward on the first one); returns the undo."""
    if _TRANSFORMS not in mlp.__dict__:
        inner = mlp.forward  # the bound method, or an instance attribute someone else set (accelerate)
        previous = mlp.__dict__.get("forward", _MISSING)

        def forward(*args, **kwargs):
            mode = _RouterLogits(mlp, router)
            with mode:
                out = inner(*args, **kwargs)
            if not mode.applied:
                raise InterventionError(
                    f"{type(mlp).__name__}.forward did not compute router logits with F.linear on the router's "
                    "weight, so the routing intervention could not be applied (this MLP class is not supported).")
            return out

        mlp.__dict__[_TRANSFORMS] = []
        mlp.__dict__["forward"] = forward
        mlp.__dict__["_workbench_previous_forward"] = previous
    mlp.__dict__[_TRANSFORMS].append(transform)

    def undo() -> None:
        transforms = mlp.__dict__.get(_TRANSFORMS, [])
        if transform in transforms:
            transforms.remove(transform)
        if not transforms and _TRANSFORMS in mlp.__dict__:
            previous = mlp.__dict__.pop("_workbench_previous_forward")
            del mlp.__dict__[_TRANSFORMS]
            if previous is _MISSING:
                mlp.__dict__.pop("forward", None)
            else:
                mlp.__dict__["forward"] = previous
    return undo


# ---- replacing the routing itself ------------------------------------------------------------------------
def add_route_override(mlp: nn.Module, router: nn.Module, experts: nn.Module,
                       fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]) -> Callable[[], None]:
    """Make the experts of `mlp` run with `fn(logits, indices, weights) -> (indices, weights)` instead of the router's
    choice (a forward pre-hook on the experts module, whose arguments are (hidden, indices, weights) on every path
    that takes them); the reading side (watch_routing) applies the same function, so traces record what ran.
    Returns the undo."""
    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = list(args[1:3]) if len(args) >= 3 else None
        if rest is None:
            raise InterventionError(f"{type(module).__name__} takes its routing in another form: routing replay "
                                    "works on the bf16, int8/nf4 and packed mxfp4 paths.")
        with torch.no_grad():
            logits = router_logits(mlp, router, hidden)
        indices, weights = fn(logits, rest[0], rest[1])
        return (hidden, indices, weights) + tuple(args[3:]), kwargs

    handle = experts.register_forward_pre_hook(pre_hook, with_kwargs=True)
    overrides = mlp.__dict__.setdefault(_OVERRIDES, [])
    overrides.append(fn)

    def undo() -> None:
        handle.remove()
        if fn in overrides:
            overrides.remove(fn)
        if not overrides:
            mlp.__dict__.pop(_OVERRIDES, None)
    return undo


# ---- reading router logits -------------------------------------------------------------------------
def router_logits(mlp: nn.Module, router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Router logits [tokens, experts] for an MLP input, with the router's own arithmetic, as the active
    transforms change them.

    The weight is looked up at call time: accelerate keeps an offloaded router's weight on "meta" until the
    router itself runs (and under mxfp4 it never runs), so it is loaded here and put back afterwards.
    """
    offload = compat.offload_hook(router) if router.weight.device.type == "meta" else None
    if offload is not None:
        offload.pre_forward(router)
    try:
        logits = F.linear(x.reshape(-1, x.shape[-1]), router.weight, getattr(router, "bias", None))
    finally:
        if offload is not None:
            offload.post_forward(router, None)
    return transform_router_logits(mlp, logits)


@dataclasses.dataclass
class Routed:
    """What one routed layer applied in one forward, for every token of the batch (flattened: [B*T, ...])."""

    logits: torch.Tensor  # [tokens, experts], the dtype the router computed in
    indices: torch.Tensor  # [tokens, k] int64
    weights: torch.Tensor  # [tokens, k], the dtype the model applied them in


class watch_routing:
    """`with watch_routing(model, adapter, layers, on_route):` calls `on_route(layer, Routed)` on every forward
    of each routed layer in `layers` (default: all), under no_grad. Hooks are removed on exit, also on error."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: list[int] | None,
                 on_route: Callable[[int, Routed], Any]):
        self.model, self.adapter, self.on_route = model, adapter, on_route
        routed = adapter.moe_layers(model)
        self.layers = routed if layers is None else [i for i in layers if i in routed]
        self.config = text_config(model.config)
        self._handles: list = []

    def __enter__(self) -> "watch_routing":
        try:
            for layer in self.layers:
                mlp = self.adapter.mlp_module(self.model, layer)
                hook = self._hook(layer, getattr(mlp, self.adapter.router))
                self._handles.append(mlp.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _hook(self, layer: int, router: nn.Module):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                logits = router_logits(module, router, x)
                indices, weights = self.adapter.route(logits, self.config)
                for override in module.__dict__.get(_OVERRIDES, ()):
                    indices, weights = override(logits, indices, weights)
                self.on_route(layer, Routed(logits, indices, weights))
        return hook


def routed_forward(model: nn.Module, adapter: Adapter, **forward_kwargs) -> tuple[Any, dict[int, Routed]]:
    """One forward (no_grad) and what every routed layer applied in it: (model output, {layer: Routed})."""
    seen: dict[int, Routed] = {}
    with torch.no_grad(), watch_routing(model, adapter, None, seen.__setitem__):
        out = model(**forward_kwargs)
    return out, seen
