"""Direct logit attribution: one token's logit at one position, split into what each part wrote into the
residual stream.

    a = attribute(s, "The capital of France is", target=" Paris")   # or s.attribute(...)
    a.top(10)                    # [(label, logit contribution), ...] largest first
    a.heads, a.experts           # [layers, heads], [layers, experts] tensors
    a.figure()                   # ranked bars; a.figure("heads") / a.figure("experts"): layers x heads/experts

The residual stream at the last layer is a sum: what entered layer 0 (the embedding), plus every attention
output, plus every MLP output. The logit is `lm_head(norm(x))[target]`. RMSNorm is not linear, so its scale
is frozen at its value on this position: RMSNorm(x) ≈ x * (g / rms(x)) with rms(x) fixed, which makes the
logit a sum of one dot product per part. With rms taken from the real residual, the parts add up to the
model's own logit (to float rounding). What it does not say is how the logit would change without a part:
removing one changes rms(x) too (and everything downstream of it); activation patching measures that.

Parts: the embedding; each attention head (its slice of o_proj's input times o_proj's weight columns for
that slice) and the o_proj bias per layer; each dense MLP; for MoE layers each chosen expert, recomputed
from the MLP input with the model's own expert weights and weighted as the model applied it (routing read
through the router-logits primitive), plus shared experts (Qwen2-MoE, with their sigmoid gate); and
lm_head's bias if it has one.

Every piece is checked against what the model itself computed in the same forward (hooks on o_proj, the
MLPs, the decoder layers, the final norm and the logits): `a.checks` holds the largest absolute error of
each check, and a piece that does not reproduce the model raises AttributionError instead of returning
numbers that do not add up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
from typing import Callable

import torch
import torch.nn.functional as F

from workbench.chat import inputs as input_rule
from workbench.errors import AttributionError
from workbench.indices import as_integer
from workbench.inspect.routing import Routed, watch_routing
from workbench.model.adapters import input_device, text_config

APPROXIMATION = "final RMSNorm frozen at this position: RMSNorm(x) ≈ x * (g / rms(x)) with rms(x) fixed"


@dataclasses.dataclass(eq=False)  # tensors: compare by identity
class Attribution:
    """One target logit at one position, decomposed. Tensors are float32 logit contributions.

    terms: one entry per piece (labels, values, kinds, layers, indices line up); they sum to `total`,
    which equals the model's own `logit` up to rounding. `heads` [layers, heads], `attention_bias` [layers],
    `mlp` [layers] (each MLP's whole output), `experts` [layers, experts] (0 where not chosen; rows of dense
    layers are 0 too, see `moe_layers`), `shared` [layers] (shared experts, 0 without).
    """

    target: int
    target_token: str
    position: int
    position_token: str
    logit: float  # the model's own logit for target at position
    labels: list[str]
    values: torch.Tensor  # [terms]
    kinds: list[str]  # "embedding", "head", "attention bias", "mlp", "expert", "shared expert", "lm_head bias"
    layers: list[int | None]
    indices: list[int | None]  # head or expert index, else None
    embedding: float
    heads: torch.Tensor
    attention_bias: torch.Tensor
    mlp: torch.Tensor
    experts: torch.Tensor | None
    shared: torch.Tensor | None
    moe_layers: list[int]
    rms_scale: float  # the frozen 1 / rms(x) of the final residual at this position
    checks: dict[str, float]  # largest absolute error of each reproduction check
    approximation: str = APPROXIMATION
    # The figure function (views.attribution.attribution_figure), handed in by the session: this layer does
    # not import views.
    figure_fn: Callable | None = dataclasses.field(default=None, repr=False)

    @property
    def total(self) -> float:
        return float(self.values.sum())

    @property
    def attention(self) -> torch.Tensor:
        """[layers]: each attention layer's contribution (its heads plus its o_proj bias)."""
        return self.heads.sum(dim=1) + self.attention_bias

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The n largest contributions by absolute value: [(label, value), ...]."""
        order = self.values.abs().argsort(descending=True)[:n]
        return [(self.labels[i], float(self.values[i])) for i in order.tolist()]

    def figure(self, kind: str = "bars", n: int = 20):
        """A plotly figure: "bars" (the n largest contributions, ranked), "heads" (layers x heads) or "experts"
        (layers x experts, MoE models)."""
        if self.figure_fn is None:
            raise AttributionError("this Attribution was made without its views: use "
                                   "workbench.views.attribution_figure(a, kind), or make it with s.attribute(...).")
        return self.figure_fn(self, kind, n)

    def __repr__(self) -> str:
        top = ", ".join(f"{label} {value:+.3f}" for label, value in self.top(3))
        return (f"Attribution(target {self.target_token!r} (id {self.target}) at position {self.position} "
                f"{self.position_token!r}: logit {self.logit:.4f} = sum of {len(self.labels)} terms "
                f"{self.total:.4f}; top: {top}; {self.approximation})")

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(label)}</td><td style='text-align:right'>{value:+.4f}</td></tr>"
                       for label, value in self.top(15))
        return (f"<div><b>Direct logit attribution</b> of <code>{html.escape(repr(self.target_token))}</code> "
                f"(id {self.target}) at position {self.position} (<code>{html.escape(repr(self.position_token))}"
                f"</code>): logit {self.logit:.4f}, sum of {len(self.labels)} terms {self.total:.4f}.</div>"
                f"<div style='color:#666;font-size:90%'>{html.escape(self.approximation)} "
                f"(1/rms = {self.rms_scale:.4g}).</div><table><tr><th>part</th><th>logit</th></tr>{rows}</table>")


# ---- inputs -------------------------------------------------------------------------------------------------
def resolve_target(tokenizer, target, vocab: int) -> int:
    """A token id: an integer in the vocabulary, or a string that is exactly one token."""
    if isinstance(target, str):
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise AttributionError(
                f"target {target!r} is {len(ids)} tokens ({pieces}), not one: give a single token's text "
                f"(often with its leading space, e.g. ' Paris') or its id.")
        return ids[0]
    target = as_integer(target, lambda: AttributionError(
        f"target must be a token id (int) or one token's text (str), not {target!r}."))
    if not 0 <= target < vocab:
        raise AttributionError(f"target id {target} is out of range: the vocabulary has ids 0..{vocab - 1}.")
    return target


def resolve_position(position, n: int) -> int:
    position = as_integer(position, lambda: AttributionError(f"position must be an integer, not {position!r}."))
    if not -n <= position < n:
        raise AttributionError(f"position {position} is out of range: the input has {n} tokens "
                               f"(positions 0..{n - 1}, or -{n}..-1 from the end).")
    return position % n


# ---- expert outputs -----------------------------------------------------------------------------------------
def expert_output(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's (unweighted) output for MLP inputs x [tokens, hidden], with the model's own expert weights
    and arithmetic: gpt-oss's clamped SwiGLU with the +1 and biases (GptOssExperts), or the gate/up SiLU-GLU of
    Mixtral, Qwen-MoE and OLMoE (`*Experts`: gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    gate_up_w, down_w = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up_w, torch.Tensor) and gate_up_w.dim() == 3 and gate_up_w.is_floating_point()
            and gate_up_w.device.type != "meta"):
        raise AttributionError(
            f"{type(experts).__name__} keeps no plain 3-D expert weights here (quantized or offloaded): attribution "
            "recomputes each chosen expert from its weights, so load the model with a bf16 or cpu preset.")
    if hasattr(experts, "limit") and hasattr(experts, "alpha"):  # gpt-oss: [E, H, 2I], gate/up interleaved
        gate_up = x @ gate_up_w[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        glu = gate * torch.sigmoid(gate * experts.alpha)
        return ((up + 1) * glu) @ down_w[e] + experts.down_proj_bias[e]
    if hasattr(experts, "act_fn"):  # Mixtral / Qwen-MoE / OLMoE: [E, 2I, H], gate first then up
        gate, up = F.linear(x, gate_up_w[e]).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, down_w[e])
    raise AttributionError(f"{type(experts).__name__}: an expert layout attribution does not know (expected "
                           "GptOssExperts or a Mixtral/Qwen/OLMoE-style *Experts module).")


# ---- the forward --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Seen:
    """What one forward computed at one position (the model's own tensors, detached)."""

    embedding: torch.Tensor | None = None
    o_in: dict = dataclasses.field(default_factory=dict)  # layer -> o_proj input [H*d]
    o_out: dict = dataclasses.field(default_factory=dict)  # layer -> o_proj output [hidden]
    mlp_in: dict = dataclasses.field(default_factory=dict)
    mlp_out: dict = dataclasses.field(default_factory=dict)
    routed: dict = dataclasses.field(default_factory=dict)  # layer -> Routed (all tokens)
    norm_in: torch.Tensor | None = None
    norm_out: torch.Tensor | None = None


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _forward(model, adapter, ids: list[int], position: int) -> tuple[_Seen, torch.Tensor]:
    """One forward with hooks that keep, at `position`, what each part computed; all removed on exit."""
    seen = _Seen()
    layers = adapter.layer_list(model)

    def at_position(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[position].detach()  # batch of one: row `position`

    def keep_input(store: dict, key):
        def hook(module, args, kwargs):
            store[key] = at_position(args[0] if args else kwargs["hidden_states"])
        return hook

    def keep_output(store: dict, key):
        def hook(module, args, out):
            store[key] = at_position(_first(out))
        return hook

    with contextlib.ExitStack() as stack:
        def add(handle):
            stack.callback(handle.remove)

        add(layers[0].register_forward_pre_hook(keep_input(seen.__dict__, "embedding"), with_kwargs=True))
        for i in range(len(layers)):
            o_proj = getattr(adapter.attention_module(model, i), "o_proj", None)
            if o_proj is None:
                raise AttributionError(f"layer {i}'s attention has no o_proj: per-head attribution needs it.")
            add(o_proj.register_forward_pre_hook(keep_input(seen.o_in, i), with_kwargs=True))
            add(o_proj.register_forward_hook(keep_output(seen.o_out, i)))
            mlp = adapter.mlp_module(model, i)
            add(mlp.register_forward_pre_hook(keep_input(seen.mlp_in, i), with_kwargs=True))
            add(mlp.register_forward_hook(keep_output(seen.mlp_out, i)))
        norm = adapter.final_norm_module(model)
        add(norm.register_forward_pre_hook(keep_input(seen.__dict__, "norm_in"), with_kwargs=True))
        add(norm.register_forward_hook(keep_output(seen.__dict__, "norm_out")))
        if adapter.is_moe:
            stack.enter_context(watch_routing(model, adapter, None, seen.routed.__setitem__))
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=False)
    return seen, out.logits[0, position].detach().float()


def _frozen_gain(norm, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(g, 1/rms(x)) of an RMSNorm: g read off the module itself (norm(ones) = g / sqrt(1 + eps)), so Gemma's
    (1 + weight) and plain weights are both what the model applies."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or getattr(norm, "bias", None) is not None:
        raise AttributionError(f"the final norm ({type(norm).__name__}) is not an RMSNorm: attribution freezes an "
                               "RMSNorm's scale and supports no other norm.")
    weight = norm.weight
    with torch.no_grad():
        ones = torch.ones(1, x.shape[-1], device=weight.device, dtype=weight.dtype)
        gain = _first(norm.forward(ones))[0].float() * (1.0 + eps) ** 0.5  # .forward: no user hooks fire
    scale = float(torch.rsqrt(x.float().pow(2).mean() + eps))
    return gain, scale


# ---- attribution --------------------------------------------------------------------------------------------
@torch.no_grad()
def attribute(session, inputs, target=None, position: int = -1, *, figure: Callable | None = None) -> Attribution:
    """Decompose the logit of `target` at `position` of `inputs` (text, chat messages, token ids or a
    Generation) into embedding, attention heads (+ o_proj bias), MLPs and chosen experts (+ shared experts).

    target: a token id or one token's text; None = the model's top prediction at that position.
    position: which position's prediction (default -1, the last; negative counts from the end).
    Approximation: the final RMSNorm's scale is frozen at its value on this position,
    RMSNorm(x) ≈ x * (g / rms(x)) with rms(x) fixed, so the decomposition is linear (see the module docs).
    figure: the function `a.figure(kind, n)` calls (the session passes views.attribution.attribution_figure).
    """
    model, tokenizer, adapter = session.model, session.tokenizer, session.adapter
    ids, _ = input_rule.token_ids(tokenizer, inputs, error=AttributionError, where="attribute's input",
                                  vocab_size=int(model.get_output_embeddings().weight.shape[0]))
    position = resolve_position(position, len(ids))
    head = model.get_output_embeddings()
    target = resolve_target(tokenizer, target, head.weight.shape[0]) if target is not None else None
    exclusive = getattr(session, "exclusive", None)
    with exclusive("attributing") if exclusive is not None else contextlib.nullcontext():
        seen, logits = _forward(model, adapter, ids, position)
    if target is None:
        target = int(logits.argmax())

    config = text_config(model.config)
    n_layers = len(adapter.layer_list(model))
    n_heads = int(config.num_attention_heads)
    gain, scale = _frozen_gain(adapter.final_norm_module(model), seen.norm_in)
    unembed = head.weight[target].float()
    u = unembed * gain * scale  # logit of a residual piece c = c · u
    checks = {}

    def logit_of(c: torch.Tensor) -> float:
        return float(c.float() @ u)

    def check(name: str, ours: torch.Tensor, model_value: torch.Tensor) -> None:
        checks[name] = max(checks.get(name, 0.0), float((ours.float() - model_value.float()).abs().max()))

    terms: list[tuple] = []  # (label, kind, value, layer, index)
    terms.append(("embedding", "embedding", logit_of(seen.embedding), None, None))
    heads = torch.zeros(n_layers, n_heads)
    attention_bias = torch.zeros(n_layers)
    mlp = torch.zeros(n_layers)
    moe_layers = adapter.moe_layers(model)
    experts = torch.zeros(n_layers, adapter.num_experts(config)) if moe_layers else None
    shared = torch.zeros(n_layers) if moe_layers else None
    residual = seen.embedding.float()
    for layer in range(n_layers):
        # attention: head h wrote W_o[:, h*d:(h+1)*d] @ z[h*d:(h+1)*d]; the bias belongs to the layer
        o_proj = adapter.attention_module(model, layer).o_proj
        if not o_proj.weight.is_floating_point() or o_proj.weight.device.type == "meta":
            raise AttributionError("o_proj's weight is quantized or offloaded: load the model with a bf16 or cpu "
                                   "preset to attribute.")
        z, w_o = seen.o_in[layer].float(), o_proj.weight.float()
        d = z.shape[-1] // n_heads
        per_head = torch.stack([w_o[:, h * d:(h + 1) * d] @ z[h * d:(h + 1) * d] for h in range(n_heads)])
        bias = o_proj.bias.float() if o_proj.bias is not None else torch.zeros_like(per_head[0])
        check("attention = heads + bias", per_head.sum(0) + bias, seen.o_out[layer])
        for h in range(n_heads):
            heads[layer, h] = logit_of(per_head[h])
            terms.append((f"L{layer} head {h}", "head", float(heads[layer, h]), layer, h))
        if o_proj.bias is not None:
            attention_bias[layer] = logit_of(bias)
            terms.append((f"L{layer} attention bias", "attention bias", float(attention_bias[layer]), layer, None))
        # MLP: the whole output (dense), or each chosen expert weighted as applied (+ shared expert)
        mlp_out = seen.mlp_out[layer]
        mlp[layer] = logit_of(mlp_out)
        if layer in moe_layers:
            pieces = _moe_pieces(adapter, adapter.mlp_module(model, layer), seen.mlp_in[layer],
                                 seen.routed[layer], position, mlp_out.dtype)
            check("mlp = weighted experts + shared", sum(p.float() for _, _, p in pieces), mlp_out)
            for kind, e, piece in pieces:
                value = logit_of(piece)
                if kind == "expert":
                    experts[layer, e] = value
                    terms.append((f"L{layer} expert {e}", kind, value, layer, e))
                else:
                    shared[layer] += value
                    terms.append((f"L{layer} shared expert", kind, value, layer, None))
        else:
            terms.append((f"L{layer} mlp", "mlp", float(mlp[layer]), layer, None))
        residual = residual + seen.o_out[layer].float()  # the decoder layer's two residual additions
        residual = residual + mlp_out.float()
    check("final residual = embedding + attention + mlp", residual, seen.norm_in)
    check("frozen norm = model's norm", seen.norm_in.float() * scale * gain, seen.norm_out)
    if getattr(head, "bias", None) is not None:
        terms.append(("lm_head bias", "lm_head bias", float(head.bias[target]), None, None))

    labels, kinds, values, layer_of, index_of = (list(column) for column in zip(*terms))
    values = torch.tensor(values, dtype=torch.float32)
    logit = float(logits[target])
    checks["logit = sum of terms"] = abs(float(values.sum()) - logit)
    _raise_if_off(checks, seen.norm_in, logit, model.dtype)
    target_token, position_token = (tokenizer.decode([i]) for i in (target, ids[position]))
    return Attribution(target, target_token, position, position_token, logit, labels, values, kinds, layer_of,
                       index_of, float(values[0]), heads, attention_bias, mlp, experts, shared, moe_layers, scale,
                       checks, figure_fn=figure)


def _moe_pieces(adapter, mlp, x: torch.Tensor, routed: Routed, position: int, dtype) -> list:
    """[(kind, expert or None, vector)]: each chosen expert's output times its applied weight, in the model's
    dtype as the model combines them, plus the shared expert (sigmoid-gated) where the MLP has one."""
    experts = getattr(mlp, adapter.experts)
    x = x.unsqueeze(0)
    pieces = []
    with torch.no_grad():
        for e, w in zip(routed.indices[position].tolist(), routed.weights[position]):
            out = expert_output(experts, e, x.to(getattr(experts, "gate_up_proj").dtype))[0]
            pieces.append(("expert", e, (out * w).to(dtype)))
        if adapter.shared_expert and hasattr(mlp, adapter.shared_expert):
            out = getattr(mlp, adapter.shared_expert)(x)[0]
            gate = getattr(mlp, f"{adapter.shared_expert}_gate", None)
            pieces.append(("shared expert", None, torch.sigmoid(gate(x))[0] * out if gate is not None else out))
    return pieces


def _raise_if_off(checks: dict, residual: torch.Tensor, logit: float, dtype) -> None:
    """AttributionError when a piece does not reproduce the model: rounding is allowed, a missing term is not."""
    relative = 1e-3 if dtype == torch.float32 else 5e-2  # 16-bit models round every sum
    scale_of = {"logit = sum of terms": max(1.0, abs(logit))}
    size = max(1.0, float(residual.float().abs().max()))
    off = {k: v for k, v in checks.items() if v > relative * scale_of.get(k, size)}
    if off:
        raise AttributionError(
            "the decomposition does not reproduce the model's own computation (" +
            "; ".join(f"{k}: max error {v:.3g}" for k, v in off.items()) +
            "): this architecture adds something to the residual stream that attribution does not model "
            "(e.g. post-attention norms), so its numbers would not add up.")
