"""Route replay: run the model with the experts (and weights) a trace recorded, whatever its router says now.

    t = s.trace(text, what=["routing"])
    with s.steer(vector, layer=2), s.replay_routing(t):       # steering's effect with the routing held fixed
        t2 = s.trace(text)

This separates what an intervention does through routing (which experts run) from what it does through the
residual stream (what the experts are given). `weights=True` applies the recorded weights too; `weights=False`
keeps the recorded experts but weights them by the current router logits, with the model's own arithmetic
(`Adapter.weights_for`). `layers` limits the replay to some routed layers.

Every forward inside must run over the trace's own tokens (a prefix-consistent slice of them, as a generation
step with a cache does): a forward over other tokens is refused rather than given routing of another text.
"""
from __future__ import annotations

import torch

from workbench.errors import InterventionError, TraceModelMismatchError
from workbench.indices import format_indices, resolve_index
from workbench.inspect.routing import add_route_override
from workbench.intervene.interventions import Intervention


class replay_routing(Intervention):
    """`with replay_routing(s, trace, layers=None, weights=True):` the recorded routing, forced."""

    name = "replay_routing"

    def __init__(self, session, trace, layers=None, weights: bool = True):
        self.trace, self.use_weights = trace, bool(weights)
        super().__init__(session, {"layers": layers})

    def _check(self, spec):
        t = self.trace
        if not hasattr(t, "routing") or not hasattr(t, "tokens"):
            raise InterventionError(f"replay_routing takes a Trace (from s.trace(..., what=['routing'])), not "
                                    f"{type(t).__name__}.")
        if t.routing is None:
            raise InterventionError("this trace holds no routing: take it with what=['routing'] (the default on MoE "
                                    "models).")
        try:
            t.check_model(self.model)
        except TraceModelMismatchError as e:
            raise InterventionError(f"replay_routing: {e}") from e
        layers = spec["layers"]
        recorded = t.routing.layers
        if layers is None:
            layers = list(recorded)
        else:
            items = [layers] if isinstance(layers, int) else list(layers)
            layers = sorted({resolve_index(x, recorded, "layer", "this trace's routing", InterventionError,
                                           count=self.n_layers) for x in items})
        return {"layers": layers}

    def describe(self) -> dict:
        return {"name": self.name, "layers": self.spec["layers"], "weights": self.use_weights,
                "tokens": len(self.trace.tokens)}

    def __repr__(self) -> str:
        return (f"replay_routing({len(self.trace.tokens)} tokens, layers={format_indices(self.spec['layers'])}, "
                f"weights={self.use_weights})")

    def _install(self) -> None:
        ids = torch.tensor(self.trace.tokens.ids, dtype=torch.int64)
        window = {"start": 0, "n": len(ids), "rows": 1}

        def on_forward(module, args, kwargs):
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                raise InterventionError("replay_routing needs input_ids in every forward (not inputs_embeds): it "
                                        "checks that the tokens are the trace's.")
            x = x.reshape(-1, x.shape[-1]).cpu()
            start = _offset(kwargs)
            n = x.shape[-1]
            if start + n > len(ids) or not bool((x == ids[start:start + n]).all()):
                raise InterventionError(
                    f"replay_routing: this forward runs tokens {start}..{start + n - 1} that are not the trace's "
                    f"({len(ids)} tokens): replay applies to the sequence the trace recorded (the same text, or a "
                    "generation that follows it).")
            window.update(start=start, n=n, rows=x.shape[0])

        handle = self.model.register_forward_pre_hook(on_forward, with_kwargs=True)
        self._undo.append(handle.remove)
        for layer in self.spec["layers"]:
            at = self.trace.routing.at(layer)
            mlp = self.adapter.mlp_module(self.model, layer)
            router, experts = getattr(mlp, self.adapter.router), getattr(mlp, self.adapter.experts)
            self._undo.append(add_route_override(mlp, router, experts, self._override(at, window)))

    def _override(self, at, window):
        adapter, config, use_weights = self.adapter, self.config, self.use_weights

        def fn(logits, indices, weights):
            part = slice(window["start"], window["start"] + window["n"])
            idx = at.indices[part].repeat(window["rows"], 1).to(indices.device, indices.dtype)
            if idx.shape != indices.shape:
                raise InterventionError(f"replay_routing: the layer routes {tuple(indices.shape)} (token, slot) pairs "
                                        f"here, the trace {tuple(idx.shape)}.")
            if use_weights:
                w = at.weights[part].repeat(window["rows"], 1).to(weights.device, weights.dtype)
            else:
                w = adapter.weights_for(logits, idx, config).to(weights.dtype)
            return idx, w
        return fn


def _offset(kwargs) -> int:
    """Where this forward's tokens start in the sequence: the cache position, else the cache's length, else 0."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    cache = kwargs.get("past_key_values")
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0
