"""What a capture asks for (`CaptureSpec`, resolved against a model or a bare config) and what one forward
recorded (`Record`). Budgets, captures and traces all read these; none reads another's internals."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable

import torch

from workbench import arguments
from workbench.errors import CaptureError, HookPointError
from workbench.indices import resolve_indices
from workbench.inspect import points as hook_points
from workbench.model import compat
from workbench.model.adapters import Adapter, adapter_for, head_dim, text_config

WHAT = ("routing", "attention", "residuals")  # the capture groups (see points.GROUPS); hook point names too
# Named points that are stored as parts of a group (the pattern is computed from q and k, with the sinks and mask).
_GROUP_OF = {"attn.pattern": "attention", "attn.sink": "attention", "mlp.router.logits": "routing",
             "mlp.router.indices": "routing", "mlp.router.weights": "routing"}


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """A capture request resolved against one architecture: which parts, layers and heads, stored how."""

    what: tuple[str, ...]
    layers: list[int]  # model layers asked for (non-negative, sorted)
    heads: list[int]  # query heads kept
    kv_heads: list[int]  # the KV heads those queries read
    routed_layers: list[int]  # layers among `layers` whose routing is recorded
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_experts: int
    top_k: int
    storage_dtype: torch.dtype  # q and k are stored in this dtype
    model_dtype: torch.dtype  # the dtype the model computes in
    family: str
    model_type: str | None
    model_name: str | None
    config_hash: str
    points: tuple[str, ...] = ()  # hook points recorded through taps (workbench/inspect/taps.py), by name
    value_dtype: torch.dtype | None = None  # residuals and points: the model's dtype unless asked (None: as model)
    vocab_size: int = 0
    expert_width: int = 0  # an expert's gated activation width (d_ff)
    eager_attention: bool = False  # the model materialises attention probabilities (budget: the forward's peak)

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any, adapter: Adapter | None = None, what: Iterable[str] | str | None = None,
                    layers=None, heads=None, dtype: torch.dtype | None = None, moe_layers: list[int] | None = None,
                    model_dtype: torch.dtype = torch.bfloat16) -> "CaptureSpec":
        """From a config alone (no weights): what budgets and size estimates need."""
        full_config, config = config, text_config(config)
        adapter = adapter or adapter_for(config)[0]
        dtype = arguments.float_dtype(dtype, CaptureError)
        n_layers = int(config.num_hidden_layers)
        space = hook_points.PointSpace.of(config, adapter, moe_layers)
        if what is None:
            groups, named = (("routing", "attention") if adapter.is_moe else ("attention",)), []
        else:
            items = [what] if isinstance(what, str) else list(what)
            if not items:
                raise CaptureError(f"what=[]: choose any of {', '.join(WHAT)}, or hook point names "
                                   "(e.g. 'blocks.*.resid_post'; s.points() lists them).")
            try:
                groups, named = hook_points.expand(space, items, None if layers is None else
                                                   resolve_indices(layers, n_layers, "layer", error=CaptureError))
            except HookPointError as e:  # said as the capture's error, with the groups too
                raise CaptureError(f"what={what!r}: choose any of {', '.join(WHAT)} (capture groups), or hook point "
                                   f"names. {e}") from e
        if "routing" in groups and not adapter.is_moe:
            raise CaptureError(f"this is a dense model (family {adapter.family!r}, no router): capture 'attention' or "
                               "'residuals', or hook points such as 'blocks.*.mlp.out'.")
        groups = list(groups)
        extra_layers = set()
        for p in named:
            group = _GROUP_OF.get(p.key)
            if group is not None:
                if group not in groups:
                    groups.append(group)
                extra_layers.add(p.layer)
        kept = tuple(p.name for p in named if p.key not in _GROUP_OF)
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        if layers is None and named and not any(w in hook_points.GROUPS for w in (what or ())):
            layers = sorted(extra_layers)  # only the layers the names ask for
        else:
            layers = sorted(set(resolve_indices(layers, n_layers, "layer", error=CaptureError)) | extra_layers)
        heads = resolve_indices(heads, n_heads, "head", error=CaptureError)
        moe = list(range(n_layers)) if moe_layers is None else moe_layers
        return cls(
            what=tuple(groups), layers=layers, heads=heads, kv_heads=sorted({h // (n_heads // n_kv) for h in heads}),
            routed_layers=[i for i in moe if i in layers] if "routing" in groups else [],
            num_layers=n_layers, num_heads=n_heads, num_kv_heads=n_kv,
            head_dim=head_dim(config),
            hidden_size=int(config.hidden_size), num_experts=adapter.num_experts(config), top_k=adapter.top_k(config),
            storage_dtype=storage_dtype(model_dtype, dtype), model_dtype=model_dtype, family=adapter.family,
            model_type=getattr(config, "model_type", None),
            model_name=getattr(config, "_name_or_path", None) or None, config_hash=config_hash(full_config),
            points=kept, value_dtype=dtype or model_dtype, vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            expert_width=int(getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0)
                             or 0))

    def resolved_points(self) -> list["hook_points.HookPoint"]:
        """The points recorded through taps, resolved (names are stored; this model's space parses them)."""
        space = hook_points.PointSpace(self.family, self.num_layers, tuple(range(self.num_layers)), self.num_experts,
                                       True)
        return [space.parse(n) for n in self.points]

    @classmethod
    def for_model(cls, model, adapter: Adapter, what=None, layers=None, heads=None,
                  dtype: torch.dtype | None = None) -> "CaptureSpec":
        """Resolved against a loaded model: its real MoE layers and compute dtype."""
        spec = cls.from_config(model.config, adapter, what, layers, heads, dtype,
                               moe_layers=adapter.moe_layers(model), model_dtype=compute_dtype(model))
        eager = compat.attention_implementation(text_config(model.config)) == "eager"
        return dataclasses.replace(spec, eager_attention=eager)

    def replace(self, **changes) -> "CaptureSpec":
        """The same request with other what/layers/heads/points (re-resolved), e.g. a cheaper one for a budget."""
        what = changes.get("what", self.what)
        points = tuple(changes.get("points", self.points))
        layers = changes.get("layers", self.layers)
        heads = changes.get("heads", self.heads)
        kv = sorted({h // self.groups for h in heads})
        routed = [i for i in self.routed_layers if i in layers] if "routing" in what else []
        if "routing" in what and "routing" not in self.what:
            raise CaptureError("replace() cannot add routing to a spec made without it")
        return dataclasses.replace(self, what=tuple(what), layers=list(layers), heads=list(heads), kv_heads=kv,
                                   routed_layers=routed, points=points)


def compute_dtype(model) -> torch.dtype:
    """The dtype a model computes in: its 16-bit float parameters' when it has any (quantized models keep
    some float32 parameters), else the first floating parameter's."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    first = params[0].dtype if params else torch.float32
    if first == torch.float32:
        return next((p.dtype for p in params if p.dtype in (torch.float16, torch.bfloat16)), first)
    return first


def storage_dtype(model_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """q/k/residual storage: `dtype` if given, else the model's dtype when 16-bit, else float16."""
    if dtype is not None:
        return dtype
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def config_hash(config) -> str:
    """sha256 of the config (sorted JSON) without what differs between presets of the same model."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                "_attn_implementation_autoset", "attn_implementation", "_commit_hash", "use_cache",
                "output_attentions", "output_hidden_states", "return_dict", "_experts_implementation"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


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
    points: dict = dataclasses.field(default_factory=dict)  # hook point name -> tensor (per sequence, see taps.py)
    positions: dict = dataclasses.field(default_factory=dict)  # expert point name -> [rows] token positions
