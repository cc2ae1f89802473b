"""Hooks that record what a forward pass computed, without changing a single bit of it.

    with capture(model, adapter, what=["routing", "attention"], layers=[0, 3]) as cap:
        model(input_ids)
    t = cap.trace(tokenizer)

- Routing is read at the MLP level on every preset: a forward pre-hook on each routed MLP takes its
  input and recomputes the router logits with the router's own arithmetic (`F.linear(x, weight, bias)`,
  same dtype and device), then `adapter.route` derives experts and weights. Under mxfp4 the MLP never
  calls its router module, so hooks on the router would never fire; this way works on every path.
  Inside an intervention (workbench/interventions.py) the logits are first changed the way the model's
  are, so the recorded logits, experts and weights are the ones the model really used.
- Attention goes through transformers' AttentionInterface: a function registered under a private name
  records the post-RoPE query and key (T*d per head instead of T*T) plus what the mask needs (sliding
  window, sinks, scaling, softcap), then calls the model's own implementation and returns its result
  untouched. The private name is registered in AttentionMaskInterface with the original
  implementation's mask function: without that, transformers silently drops the causal mask.
- Everything is undone in `__exit__` (and if installing fails half-way): hooks removed, names
  unregistered, each config's attention implementation written back.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from workbench.model.adapters import Adapter
from workbench.errors import CaptureError
from workbench.intervene.interventions import transform_router_logits

WHAT = ("routing", "attention", "residuals")
_names = itertools.count()


@dataclasses.dataclass
class Record:
    """What one forward pass recorded (CPU tensors; batch of one)."""

    input_ids: torch.Tensor | None = None  # [T] int64
    key_mask: torch.Tensor | None = None  # [T_keys] bool: padding mask from the inputs, None = all visible
    q: dict = dataclasses.field(default_factory=dict)  # layer -> [heads kept, T, head_dim]
    k: dict = dataclasses.field(default_factory=dict)  # layer -> [kv heads kept, T_keys, head_dim]
    attn: dict = dataclasses.field(default_factory=dict)  # layer -> {scaling, window, softcap, sinks, offset}
    logits: dict = dataclasses.field(default_factory=dict)  # layer -> [T, experts] float32
    indices: dict = dataclasses.field(default_factory=dict)  # layer -> [T, k] int64
    weights: dict = dataclasses.field(default_factory=dict)  # layer -> [T, k], the dtype the model applied
    residuals: dict = dataclasses.field(default_factory=dict)  # layer -> [T, hidden]
    residual_dtype: str | None = None  # the dtype the model computed residuals in


def storage_dtype(model_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """q/k/residual storage: `dtype` if given, else the model's dtype when 16-bit, else float16."""
    if dtype is not None:
        return dtype
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def _store(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Detach to the CPU in `dtype`; values float16 cannot hold stay float32 rather than become inf."""
    if dtype == torch.float16 and x.dtype != torch.float16 and x.numel() and x.abs().max() > 65000:
        dtype = torch.float32
    y = x.detach().to("cpu", dtype)
    return y.clone() if y.data_ptr() == x.data_ptr() else y  # never keep a view into the model's tensors


def resolve_indices(requested, count: int, kind: str) -> list[int]:
    """None -> all; an int or a list of ints (negative counts from the end) -> sorted, checked indices."""
    if requested is None:
        return list(range(count))
    items = [requested] if isinstance(requested, int) else list(requested)
    out = []
    for i in items:
        if not isinstance(i, int) or isinstance(i, bool) or not -count <= i < count:
            raise CaptureError(f"{kind} {i!r} does not exist: valid {kind}s are 0..{count - 1} (or -{count}..-1).")
        out.append(i % count)
    return sorted(set(out))


def router_logits(mlp, router, x: torch.Tensor) -> torch.Tensor:
    """Router logits for an MLP input, with the router's own arithmetic, as active interventions change them.

    The weight is looked up at call time: accelerate keeps an offloaded router's weight on "meta" until the
    router itself runs (and under mxfp4 it never runs), so it is loaded here and put back afterwards.
    """
    offload = getattr(router, "_hf_hook", None) if router.weight.device.type == "meta" else None
    if offload is not None:
        offload.pre_forward(router)
    try:
        logits = F.linear(x.reshape(-1, x.shape[-1]), router.weight, getattr(router, "bias", None))
    finally:
        if offload is not None:
            offload.post_forward(router, None)
    return transform_router_logits(mlp, logits)


class Capture:
    """Context manager recording routing, attention q/k and residuals of every forward inside it."""

    def __init__(self, model, adapter: Adapter, what: Iterable[str] | None = None, layers=None, heads=None,
                 dtype: torch.dtype | None = None, budget=None):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.model, self.adapter, self.config = model, adapter, config
        what = (what,) if isinstance(what, str) else what
        what = tuple(what) if what is not None else (("routing", "attention") if adapter.is_moe else ("attention",))
        if not set(what) <= set(WHAT) or not what:
            raise CaptureError(f"what={what!r}: choose any of {', '.join(WHAT)}.")
        if "routing" in what and not adapter.is_moe:
            raise CaptureError(f"{adapter.family} is a dense model (no router): capture 'attention' or 'residuals'.")
        self.what = what
        n_layers = len(adapter.layer_list(model))
        self.layers = resolve_indices(layers, n_layers, "layer")
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.heads = resolve_indices(heads, self.n_heads, "head")
        self.groups = self.n_heads // self.n_kv
        self.kv_heads = sorted({h // self.groups for h in self.heads})
        self.routed_layers = [i for i in adapter.moe_layers(model) if i in self.layers] if "routing" in what else []
        params = [p for p in model.parameters() if p.is_floating_point()]
        self.model_dtype = params[0].dtype if params else torch.float32
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in params) and self.model_dtype == torch.float32:
            self.model_dtype = next(p.dtype for p in params if p.dtype in (torch.float16, torch.bfloat16))
        self.dtype = storage_dtype(self.model_dtype, dtype)
        self.budget = budget
        self.records: list[Record] = []
        self._handles: list = []
        self._restore: list = []
        self._current: Record | None = None

    # ---- installing and removing --------------------------------------------------------------
    def __enter__(self) -> "Capture":
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _install(self) -> None:
        model, adapter = self.model, self.adapter
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for layer in self.routed_layers:
            hook = self._routing_hook(layer, getattr(adapter.mlp_module(model, layer), adapter.router))
            self._handles.append(adapter.mlp_module(model, layer).register_forward_pre_hook(hook, with_kwargs=True))
        if "residuals" in self.what:
            for layer in self.layers:
                module = adapter.layer_list(model)[layer]
                self._handles.append(module.register_forward_hook(self._residual_hook(layer)))
        if "attention" in self.what:
            self._install_attention()

    def _install_attention(self) -> None:
        modules = {id(self.adapter.attention_module(self.model, i)): i for i in self.layers}
        configs = {id(c): c for c in [self.model.config] + [self.adapter.attention_module(self.model, i).config
                                                             for i in self.layers]}
        original = self.config._attn_implementation or "eager"
        # Keep "flash" in the name when the original has it: transformers checks the name for "flash".
        name = f"workbench_capture_{next(_names)}_{original.replace('/', '_')}"
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else None
        originals: dict = {}

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = modules.get(id(module))
            if layer is not None and self._current is not None:
                self._record_attention(layer, module, query, key, kwargs)
            fn = originals.get(type(module))
            if fn is None:
                fn = originals[type(module)] = _original_attention(module, original)
            return fn(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        self._restore.append(lambda: AttentionInterface._global_mapping.pop(name, None))
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
            self._restore.append(lambda: AttentionMaskInterface._global_mapping.pop(name, None))
        for config in configs.values():
            previous = config._attn_implementation_internal
            self._restore.append(lambda c=config, p=previous: setattr(c, "_attn_implementation_internal", p))
            config._attn_implementation_internal = name  # the attribute itself: no sub-config recursion

    def _remove(self) -> None:
        errors = []
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in reversed(self._restore):
            try:
                undo()
            except Exception as e:  # keep undoing the rest; report afterwards
                errors.append(e)
        self._restore.clear()
        self._current = None
        if errors:
            raise errors[0]

    def trace(self, tokenizer=None, call: int | None = None, channels=None, preset: str | None = None):
        """The Trace of the forward recorded here (`call` picks one when there were several)."""
        from workbench.inspect.trace import Trace

        if not self.records:
            raise CaptureError("nothing was recorded: run a forward of the model inside `with capture(...)`.")
        if call is None and len(self.records) > 1:
            raise CaptureError(f"{len(self.records)} forwards were recorded (e.g. one per generated token): "
                               f"pick one with cap.trace(call=i), 0..{len(self.records) - 1}.")
        return Trace.from_record(self, self.records[-1 if call is None else call], tokenizer, channels, preset)

    # ---- the hooks ----------------------------------------------------------------------------
    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = tuple((ids if ids is not None else embeds).shape)
        if len(shape) > 1 and shape[0] != 1:
            raise CaptureError(f"capture records one sequence at a time; this forward has a batch of {shape[0]}.")
        tokens = shape[-1] if ids is not None else shape[-2]
        if self.budget is not None:
            from workbench.inspect.trace import check_budget
            check_budget(self, tokens)
        mask = kwargs.get("attention_mask")
        record = Record(input_ids=ids.reshape(-1).detach().cpu().clone() if ids is not None else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            record.key_mask = mask[0].detach().to("cpu", torch.bool).clone()
        self.records.append(record)
        self._current = record

    def _routing_hook(self, layer: int, router):
        def hook(module, args, kwargs):
            if self._current is None:
                return
            x = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                logits = router_logits(module, router, x)
                indices, weights = self.adapter.route(logits, self.config)
            self._current.logits[layer] = logits.detach().to("cpu", torch.float32)
            self._current.indices[layer] = indices.detach().to("cpu", torch.int64)
            self._current.weights[layer] = weights.detach().cpu().clone()
        return hook

    def _residual_hook(self, layer: int):
        def hook(module, args, output):
            if self._current is not None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                self._current.residuals[layer] = _store(out[0], self.dtype)
                self._current.residual_dtype = str(out.dtype).removeprefix("torch.")
        return hook

    def _record_attention(self, layer, module, query, key, kwargs) -> None:
        q = query[0] if query.shape[1] == self.n_heads else query[0].transpose(0, 1)  # [H, T, d]
        k = key[0] if key.shape[1] == self.n_kv else key[0].transpose(0, 1)
        sinks = kwargs.get("s_aux")
        scaling = kwargs.get("scaling")
        self._current.q[layer] = _store(q if len(self.heads) == self.n_heads else q[self.heads], self.dtype)
        self._current.k[layer] = _store(k if len(self.kv_heads) == self.n_kv else k[self.kv_heads], self.dtype)
        self._current.attn[layer] = {
            "scaling": float(scaling if scaling is not None else getattr(module, "scaling", q.shape[-1] ** -0.5)),
            "window": _int_or_none(kwargs["sliding_window"] if "sliding_window" in kwargs
                                   else getattr(module, "sliding_window", None)),
            "softcap": kwargs.get("softcap"),
            "sinks": None if sinks is None else sinks.detach().to("cpu", torch.float32)[self.heads].clone(),
            "offset": int(k.shape[1] - q.shape[1]),  # keys from a cache come before the queries
        }


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def _original_attention(module, implementation: str):
    """The attention function the module would call: its modeling file's interface, eager by default."""
    modeling = sys.modules[type(module).__module__]
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    eager = getattr(modeling, "eager_attention_forward", None)
    if implementation == "eager" and eager is not None:
        return eager
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as eager  # last resort
    return interface.get_interface(implementation, eager)


def capture(model, adapter: Adapter, what: Iterable[str] | None = None, layers=None, heads=None,
            dtype: torch.dtype | None = None, budget=None) -> Capture:
    """Record routing/attention/residuals of any forward run inside `with capture(...) as cap:`."""
    return Capture(model, adapter, what=what, layers=layers, heads=heads, dtype=dtype, budget=budget)
