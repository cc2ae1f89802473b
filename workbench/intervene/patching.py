"""Activation patching: which activations carry the difference between a clean and a corrupt prompt.

    r = patch(model, tokenizer, adapter, "When John and Mary went to the store, John gave a drink to",
              "When John and Mary went to the store, Mary gave a drink to", at="residual")
    r.scores        # [layers, positions] the metric with that one site set to its clean value
    r.normalized    # (patched - corrupt) / (clean - corrupt): 1 = that site alone restores the clean answer

One clean forward caches the clean activations at the site kind; one corrupt forward gives the corrupt
baseline; then the corrupt input, repeated across a batch, runs with each batch row patched at a different
site: ceil(sites / batch_size) batched forwards. Site kinds:

- "residual": (layer, position), the decoder layer's output at that position.
- "mlp": (layer, position), the MLP's output (its first output on MLPs that return a tuple, as gpt-oss does).
- "attention_heads": (layer, head), that head's slice [h*head_dim, (h+1)*head_dim) of o_proj's input, at
  every position.
- "experts" (MoE only): (routed layer, expert), that expert's router logit at every position set to its clean
  value through the router-logits primitive (inspect/routing.py), so the model's own top-k then decides which
  experts run and with what weights.

Every site kind replaces values position by position, so clean and corrupt must have the same number of
tokens. The default metric is the logit difference at the last position between the clean run's greedy next
token and the corrupt run's (or `answers=(clean_token, corrupt_token)`); `metric(logits[tokens, vocab]) -> float`
replaces it, given every position's logits (float32), so it can read any position. Hooks and router transforms exist only inside the call and are removed in `finally`.

Batched and unbatched forwards may differ in the last bits (matrix products of other shapes): batch_size=1
makes every patched forward the same shape as the clean and corrupt ones.

Why one module of about 520 lines: the four site kinds share one clean-cache / patched-forward primitive, one cost
model and one budget message; split apart, a change to one kind would have to be repeated in the others.
"""
from __future__ import annotations

import dataclasses
import html
import inspect
import math
from typing import Callable

import torch
from torch import nn

from workbench.chat import inputs as input_rule
from workbench.errors import PatchingBudgetError, PatchingError
from workbench.indices import format_indices, resolve_index, resolve_indices
from workbench.inspect.budget import parse_budget
from workbench.inspect.routing import (
    LogitTransform,
    add_router_transform,
    watch_routing,
)
from workbench.model.adapters import Adapter, input_device, text_config
from workbench.model.adapters import head_dim as adapter_head_dim
from workbench.sizes import format_bytes

SITES = ("residual", "attention_heads", "mlp", "experts")
POSITIONAL = ("residual", "mlp")  # one site per (layer, position); the others: one per (layer, head/expert)


# ---- what a request is and what it costs ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatchCost:
    """What a patching request costs, computed before anything runs."""

    at: str
    layers: list[int]            # model layers patched (the rows of the result)
    tokens: int
    per_layer: int               # sites per layer: tokens (residual, mlp), heads, or experts
    batch_size: int
    cached_bytes: int            # the clean activations kept for the whole call
    batch_bytes: int             # estimate of one batched forward's largest live activations (see forward_bytes)

    @property
    def sites(self) -> int:
        return len(self.layers) * self.per_layer

    @property
    def batches(self) -> int:
        return math.ceil(self.sites / self.batch_size)

    @property
    def forwards(self) -> int:
        """One clean forward, one corrupt forward, and one per batch of patched rows."""
        return 2 + self.batches

    @property
    def total_bytes(self) -> int:
        return self.cached_bytes + self.batch_bytes

    def __str__(self) -> str:
        unit = {"residual": "positions", "mlp": "positions", "attention_heads": "heads", "experts": "experts"}[self.at]
        return (f"patching at {self.at!r}: {len(self.layers)} layers ({format_indices(self.layers)}) x {self.per_layer} "
                f"{unit} = {self.sites} sites; {self.forwards} forwards (clean, corrupt, {self.batches} batches of up "
                f"to {self.batch_size} rows, {self.tokens} tokens each); {format_bytes(self.cached_bytes)} of cached "
                f"clean activations + ~{format_bytes(self.batch_bytes)} for one batch = {format_bytes(self.total_bytes)}")

    __repr__ = __str__


def _geometry(model: nn.Module, adapter: Adapter) -> dict:
    config = text_config(model.config)
    heads = int(config.num_attention_heads)
    head_dim = adapter_head_dim(config)
    element = next(p.dtype for p in model.parameters() if p.is_floating_point()).itemsize
    return dict(config=config, layers=len(adapter.layer_list(model)), heads=heads, head_dim=head_dim,
                kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), element=element,
                experts=adapter.num_experts(config), routed=adapter.moe_layers(model))


def _check_at(at, adapter: Adapter) -> str:
    if at not in SITES:
        raise PatchingError(f"at={at!r} is not a site kind: choose one of {', '.join(map(repr, SITES))} "
                            "(residual: decoder layer output per position; mlp: MLP output per position; "
                            "attention_heads: one head at all positions; experts: one router logit, MoE only).")
    if at == "experts" and not adapter.is_moe:
        raise PatchingError(f"at='experts' needs a Mixture-of-Experts model (gpt-oss, Mixtral, Qwen-MoE, OLMoE); "
                            f"this is a dense model (family {adapter.family!r}, no router). Patch at='mlp' (the "
                            "whole MLP output per position), 'residual' or 'attention_heads' instead.")
    return at


def _layers(layers, at: str, g: dict) -> list[int]:
    if at != "experts":
        return resolve_indices(layers, g["layers"], "layer", "this model", PatchingError)
    routed = g["routed"]
    if layers is None:
        return list(routed)
    items = [layers] if not isinstance(layers, (list, tuple, set, range)) else list(layers)
    out = set()
    for i in items:
        i = resolve_index(i, range(g["layers"]), "layer", "this model", PatchingError, count=g["layers"])
        if i not in routed:
            raise PatchingError(f"layer {i} has a dense MLP (no router), so it has no experts to patch: this model's "
                                f"routed layers are {format_indices(routed)}.")
        out.add(i)
    return sorted(out)


def forward_bytes(g: dict, batch: int, tokens: int, logits_positions: int) -> int:
    """Estimate (not a measurement) of the largest live activations of one forward of `batch` x `tokens` under
    no_grad: the residual stream and one layer's attention and MLP intermediates, the attention probabilities
    (eager: heads x tokens per query), and the float32 logits of the positions the model computes them for."""
    c = g["config"]
    k = max(int(getattr(c, "num_experts_per_tok", 1) or 1), 1)
    intermediate = int(getattr(c, "moe_intermediate_size", None) or getattr(c, "intermediate_size", None)
                       or 4 * c.hidden_size)
    per_token = 4 * c.hidden_size + (g["heads"] + 2 * g["kv_heads"]) * g["head_dim"] + 2 * k * intermediate
    per_token += g["heads"] * tokens
    return batch * tokens * per_token * g["element"] + batch * logits_positions * int(c.vocab_size) * 4


def _site_width(at: str, g: dict) -> int:
    """Values cached per token and layer."""
    c = g["config"]
    return {"residual": c.hidden_size, "mlp": c.hidden_size, "attention_heads": g["heads"] * g["head_dim"],
            "experts": g["experts"]}[at]


def _cost(model, adapter, at, layers, tokens: int, batch_size: int, g: dict | None = None,
          all_positions: bool = False) -> PatchCost:
    g = g or _geometry(model, adapter)
    per_layer = tokens if at in POSITIONAL else g["heads"] if at == "attention_heads" else g["experts"]
    keep = 1 if _forward_extra(model) and not all_positions else tokens
    return PatchCost(at=at, layers=layers, tokens=tokens, per_layer=per_layer, batch_size=batch_size,
                     cached_bytes=len(layers) * tokens * _site_width(at, g) * g["element"],
                     batch_bytes=forward_bytes(g, batch_size, tokens, keep))


def _check_budget(model, adapter, cost: PatchCost, budget, layers_arg, g: dict) -> None:
    if budget is None:
        return
    limit = parse_budget(budget)
    if cost.total_bytes <= limit:
        return
    options = []
    per_layer = cost.cached_bytes // max(len(cost.layers), 1)
    fit = int((limit - cost.batch_bytes) // max(per_layer, 1))
    if 1 <= fit < len(cost.layers):
        few = cost.layers[:fit]
        options.append(f"fewer layers (layers={few if fit <= 4 else f'[{few[0]}, {few[1]}, ...] ({fit} layers)'}): "
                       f"{format_bytes(cost.batch_bytes + fit * per_layer)}")
    smaller = next((b for b in range(cost.batch_size - 1, 0, -1)
                    if _cost(model, adapter, cost.at, cost.layers, cost.tokens, b, g).total_bytes <= limit), None)
    if smaller is not None:
        options.append(f"a smaller batch (batch_size={smaller}): "
                       f"{format_bytes(_cost(model, adapter, cost.at, cost.layers, cost.tokens, smaller, g).total_bytes)}")
    for other in SITES:
        if other == cost.at or (other == "experts" and not adapter.is_moe):
            continue
        try:
            alt = _cost(model, adapter, other, _layers(layers_arg, other, g), cost.tokens, cost.batch_size, g)
        except PatchingError:
            continue
        if alt.total_bytes <= limit:
            options.append(f"another site kind (at={other!r}): {format_bytes(alt.total_bytes)}")
    if not options:
        options.append("none of fewer layers, a smaller batch or another site kind fits")
    raise PatchingBudgetError(
        f"This patching request needs {format_bytes(cost.total_bytes)} ({format_bytes(cost.cached_bytes)} of cached "
        f"clean activations at {cost.at!r} for {len(cost.layers)} layers x {cost.tokens} tokens, + ~"
        f"{format_bytes(cost.batch_bytes)} for one batch of {cost.batch_size}), over the budget of "
        f"{format_bytes(limit)}. Cheaper requests: " + "; ".join(options) +
        f". Or raise the budget (budget='{math.ceil(cost.total_bytes / 1e6)}MB').")


# ---- inputs ------------------------------------------------------------------------------------------------
def _ids(tokenizer, x, name: str, model=None) -> list[int]:
    """Token ids of one input by the workbench's input rule (a string is raw text; wb.user(...) a chat turn),
    within `model`'s vocabulary."""
    vocab = getattr(text_config(model.config), "vocab_size", None) if model is not None else None
    return input_rule.token_ids(tokenizer, x, error=PatchingError, where=name, vocab_size=vocab)[0]


def _strings(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _check_lengths(tokenizer, clean: list[int], corrupt: list[int]) -> None:
    if len(clean) == len(corrupt):
        return
    raise PatchingError(
        f"clean has {len(clean)} tokens and corrupt has {len(corrupt)}: activation patching replaces activations "
        "position by position, so both prompts need the same number of tokens, for every site kind (residual "
        "and mlp patch one position; attention_heads and experts patch a head's output or an expert's router "
        "logit at every position). Align them: reword so the words that differ take the same number of tokens, "
        "or pad the shorter prompt with filler words where it does not change the meaning, or pass token ids. "
        f"clean tokens: {_strings(tokenizer, clean)}; corrupt tokens: {_strings(tokenizer, corrupt)}.")


def _answer(tokenizer, a, vocab: int, which: str) -> int:
    if isinstance(a, str):
        ids = tokenizer.encode(a, add_special_tokens=False)
        if len(ids) != 1:
            raise PatchingError(f"answers: the {which} answer {a!r} is {len(ids)} tokens {_strings(tokenizer, ids)}; "
                                "give one token (as a string that tokenizes to one token, or its id).")
        return ids[0]
    if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < vocab:
        return a
    raise PatchingError(f"answers: the {which} answer must be a token id in 0..{vocab - 1} or a one-token string, "
                        f"not {a!r}.")


# ---- the two primitives: cache the clean activations, run patched rows ----------------------------------
def _forward_extra(model) -> dict:
    """Only the last position's logits are needed: skip the vocabulary projection of the others."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _last_logits(model, input_ids: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
    """float32 logits [batch, vocab] of the last position, or [batch, tokens, vocab] with all_positions."""
    if all_positions:
        return model(input_ids=input_ids, use_cache=False).logits.float()
    out = model(input_ids=input_ids, use_cache=False, **_forward_extra(model))
    return out.logits[:, -1].float()


def _module(model, adapter: Adapter, at: str, layer: int) -> nn.Module:
    if at == "residual":
        return adapter.layer_list(model)[layer]
    if at == "mlp":
        return adapter.mlp_module(model, layer)
    attention = adapter.attention_module(model, layer)
    if getattr(attention, "o_proj", None) is None:
        raise PatchingError(f"layer {layer}'s attention ({type(attention).__name__}) has no o_proj, so its heads' "
                            "outputs cannot be found: patch at='residual' or 'mlp' instead.")
    return attention.o_proj


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, x: torch.Tensor):
    return (x, *output[1:]) if isinstance(output, (tuple, list)) else x


def clean_cache(model, adapter: Adapter, at: str, layers: list[int], ids: list[int],
                all_positions: bool = False) -> tuple[torch.Tensor, dict]:
    """One forward over `ids`: (last-position logits [vocab] float32, or [tokens, vocab] with all_positions,
    {layer: activations [tokens, width]}).

    residual/mlp: the module's output; attention_heads: o_proj's input; experts: the router logits as the
    router-logits primitive reads them (with any active routing interventions applied)."""
    cache: dict[int, torch.Tensor] = {}
    input_ids = torch.tensor([ids], dtype=torch.int64, device=input_device(model))
    handles = []
    with torch.no_grad():
        try:
            if at == "experts":
                with watch_routing(model, adapter, layers, lambda layer, r: cache.__setitem__(layer, r.logits.clone())):
                    logits = _last_logits(model, input_ids, all_positions)
                return logits[0], cache
            for layer in layers:
                module = _module(model, adapter, at, layer)
                if at == "attention_heads":
                    def hook(m, args, kwargs, layer=layer):
                        cache[layer] = (args[0] if args else kwargs["input"])[0].clone()
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    def hook(m, args, output, layer=layer):
                        cache[layer] = _first(output)[0].clone()
                    handles.append(module.register_forward_hook(hook))
            logits = _last_logits(model, input_ids, all_positions)
        finally:
            for h in handles:
                h.remove()
    return logits[0], cache


def patched_logits(model, adapter: Adapter, at: str, ids: list[int], cache: dict,
                   rows: list[list[tuple[int, int]]], all_positions: bool = False) -> torch.Tensor:
    """Last-position logits [len(rows), vocab] float32 (or [len(rows), tokens, vocab] with all_positions) of
    `ids` repeated once per row, row r with each of its
    sites (layer, index) set to the cached value: index is a position (residual, mlp), a head
    (attention_heads) or an expert (experts). One batched forward; nothing stays installed afterwards."""
    g = _geometry(model, adapter)
    tokens = len(ids)
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for r, sites in enumerate(rows):
        for layer, index in sites:
            by_layer.setdefault(layer, ([], []))
            by_layer[layer][0].append(r)
            by_layer[layer][1].append(index)
    device = input_device(model)
    input_ids = torch.tensor([ids] * len(rows), dtype=torch.int64, device=device)
    undo: list[Callable[[], None]] = []
    with torch.no_grad():
        try:
            for layer, (r, i) in by_layer.items():
                value = cache[layer]
                r_t = torch.tensor(r, device=value.device)
                i_t = torch.tensor(i, device=value.device)
                if at == "experts":
                    mlp = adapter.mlp_module(model, layer)
                    transform = LogitTransform(_expert_patch(value, r_t, i_t, tokens), set(), f"patch layer {layer}")
                    undo.append(add_router_transform(mlp, getattr(mlp, adapter.router), transform))
                elif at == "attention_heads":
                    hook = _head_patch(value, r_t, i_t, g["heads"], g["head_dim"], layer)
                    undo.append(_module(model, adapter, at, layer).register_forward_pre_hook(hook, with_kwargs=True).remove)
                else:
                    undo.append(_module(model, adapter, at, layer).register_forward_hook(_position_patch(value, r_t, i_t)).remove)
            return _last_logits(model, input_ids, all_positions)
        finally:
            for fn in reversed(undo):
                fn()


def _position_patch(value, rows, positions):
    def hook(module, args, output):
        x = _first(output).clone()  # never write into the model's own tensor
        x[rows, positions] = value[positions].to(x.dtype)
        return _replace_first(output, x)
    return hook


def _head_patch(value, rows, heads, n_heads: int, head_dim: int, layer: int):
    clean = value.view(value.shape[0], n_heads, head_dim)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if x.shape[-1] != n_heads * head_dim:
            raise PatchingError(f"layer {layer}: o_proj's input has width {x.shape[-1]}, not heads x head_dim = "
                                f"{n_heads} x {head_dim}, so the heads' slices cannot be found.")
        x = x.clone()
        # [rows, :, heads, :] puts the indexed (row, head) pairs first: [pairs, tokens, head_dim]
        x.view(*x.shape[:-1], n_heads, head_dim)[rows, :, heads, :] = clean[:, heads, :].transpose(0, 1).to(x.dtype)
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": x})
    return hook


def _expert_patch(value, rows, experts, tokens: int):
    def fn(logits: torch.Tensor) -> torch.Tensor:  # [batch * tokens, experts], batch rows one after another
        out = logits.clone()
        out.view(-1, tokens, out.shape[-1])[rows, :, experts] = value[:, experts].transpose(0, 1).to(out.dtype)
        return out
    return fn


# ---- the result ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PatchingResult:
    at: str
    layers: list[int]               # rows: model layers
    sites: list[str]                # columns: clean token strings (residual, mlp), "head h", "expert e"
    scores: torch.Tensor            # [layers, sites] float32: the metric with that site patched
    clean: float                    # the metric on the clean run
    corrupt: float                  # the metric on the corrupt run
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    answers: tuple[int, int] | None  # (clean, corrupt) answer token ids of the default metric; None for a custom one
    answer_strings: tuple[str, str] | None
    cost: PatchCost
    figure_fn: Callable | None = dataclasses.field(default=None, repr=False)
    method: str = "patching"        # or "attribution": scores estimated by gradient x difference (attribution_patching)

    @property
    def runs(self) -> str:
        return "2 forwards + 1 backward" if self.method == "attribution" else f"{self.cost.forwards} forwards"

    @property
    def normalized(self) -> torch.Tensor:
        """(patched - corrupt) / (clean - corrupt): 0 = no effect, 1 = the clean metric; NaN if clean == corrupt."""
        gap = self.clean - self.corrupt
        if gap == 0:
            return torch.full_like(self.scores, math.nan)
        return (self.scores - self.corrupt) / gap

    @property
    def metric_name(self) -> str:
        if self.answer_strings is None:
            return "metric"
        return f"logit({self.answer_strings[0]!r}) - logit({self.answer_strings[1]!r})"

    def top(self, n: int = 5) -> list[dict]:
        """The n sites with the largest normalised score (the metric when clean == corrupt)."""
        z = self.normalized if self.clean != self.corrupt else self.scores
        order = torch.argsort(z.flatten().nan_to_num(-math.inf), descending=True)[:n]
        width = len(self.sites)
        return [{"layer": self.layers[int(i) // width], "site": self.sites[int(i) % width],
                 "index": int(i) % width, "score": float(self.scores.flatten()[i]),
                 "normalized": float(self.normalized.flatten()[i])} for i in order]

    def figure(self, **kwargs):
        """Plotly heatmap, layers x sites (workbench.views.patching_heatmap)."""
        if self.figure_fn is None:
            raise PatchingError("this result was made outside a Session: draw it with "
                                "workbench.views.patching_heatmap(result).")
        return self.figure_fn(self, **kwargs)

    def __repr__(self) -> str:
        tops = ", ".join(f"L{t['layer']} {t['site']!r}: {t['normalized']:.2f}" for t in self.top(3))
        return (f"PatchingResult({'attribution, ' if self.method == 'attribution' else ''}at={self.at!r}, {len(self.layers)} layers x {len(self.sites)} sites, "
                f"{self.metric_name}: clean {self.clean:.4g}, corrupt {self.corrupt:.4g}; top normalised: {tops})")

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{t['layer']}</td><td>{html.escape(repr(t['site']))}</td><td>{t['score']:.4g}</td>"
                       f"<td>{t['normalized']:.3f}</td></tr>" for t in self.top(5))
        title = "Attribution patching (estimated)" if self.method == "attribution" else "Activation patching"
        return (f"<p><b>{title}</b> at <code>{self.at}</code>: {len(self.layers)} layers x "
                f"{len(self.sites)} sites · {html.escape(self.metric_name)}: clean <b>{self.clean:.4g}</b>, corrupt "
                f"<b>{self.corrupt:.4g}</b> · {self.runs}</p><table><tr><th>layer</th><th>site</th>"
                f"<th>patched</th><th>normalised</th></tr>{rows}</table><p>Draw it: <code>result.figure()</code></p>")


# ---- the whole request -------------------------------------------------------------------------------------
def patch(model, tokenizer, adapter: Adapter, clean, corrupt, *, at: str = "residual", metric=None, answers=None,
          layers=None, batch_size: int = 8, budget="2GB", dry_run: bool = False,
          figure: Callable | None = None) -> PatchingResult | PatchCost:
    """Patch every site of kind `at` (in `layers`, default all) of the corrupt run with its clean value.

    clean, corrupt: strings (tokenized as they are), chat messages, or token ids, of the same token length.
    metric: None (logit difference at the last position between the clean and the corrupt answer: each run's
    greedy next token, or `answers=(clean_token, corrupt_token)` as ids or one-token strings), or a function
    `metric(logits [tokens, vocab] float32) -> float` of one run's logits at every position (the last is
    logits[-1]). dry_run=True returns the PatchCost without running.
    budget: cached clean activations + one batch's estimated activations ('2GB', bytes or None).
    """
    at = _check_at(at, adapter)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PatchingError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if metric is not None and answers is not None:
        raise PatchingError("answers= chooses the tokens of the default metric; with metric= compute what you "
                            "need from the logits inside it and leave answers out.")
    if metric is not None and not callable(metric):
        raise PatchingError(f"metric must be a function of one run's logits [tokens, vocab], not {metric!r}.")
    full = metric is not None  # a metric of the user's sees every position; the default needs the last only
    clean_ids, corrupt_ids = _ids(tokenizer, clean, "clean", model), _ids(tokenizer, corrupt, "corrupt", model)
    _check_lengths(tokenizer, clean_ids, corrupt_ids)
    g = _geometry(model, adapter)
    chosen = _layers(layers, at, g)
    vocab = int(g["config"].vocab_size)
    if answers is not None:
        if not isinstance(answers, (list, tuple)) or len(answers) != 2:
            raise PatchingError(f"answers must be a pair (clean_token, corrupt_token), not {answers!r}.")
        answers = (_answer(tokenizer, answers[0], vocab, "clean"), _answer(tokenizer, answers[1], vocab, "corrupt"))
    cost = _cost(model, adapter, at, chosen, len(clean_ids), batch_size, g, all_positions=full)
    if dry_run:
        return cost
    _check_budget(model, adapter, cost, budget, layers, g)

    clean_logits, cache = clean_cache(model, adapter, at, chosen, clean_ids, all_positions=full)
    with torch.no_grad():
        corrupt_logits = _last_logits(model, torch.tensor([corrupt_ids], device=input_device(model)), full)[0]
    if metric is None:
        if answers is None:
            answers = (int(clean_logits.argmax()), int(corrupt_logits.argmax()))
            if answers[0] == answers[1]:
                raise PatchingError(
                    f"clean and corrupt both predict {tokenizer.decode([answers[0]])!r} next, so the default metric "
                    "(the logit difference between their answers) is 0 everywhere: pass answers=(clean_token, "
                    "corrupt_token), or metric=, or prompts whose next tokens differ.")
        a, b = answers

        def measure(logits: torch.Tensor) -> torch.Tensor:
            return logits[..., a] - logits[..., b]
    else:
        def measure(logits: torch.Tensor) -> torch.Tensor:  # [tokens, vocab] (one run) or [runs, tokens, vocab]
            runs = logits[None] if logits.dim() == 2 else logits
            return torch.tensor([_number(metric(run)) for run in runs])

    sites = [(layer, i) for layer in chosen for i in range(cost.per_layer)]
    scores = torch.empty(len(sites))
    for start in range(0, len(sites), batch_size):
        batch = sites[start:start + batch_size]
        scores[start:start + len(batch)] = measure(patched_logits(model, adapter, at, corrupt_ids, cache,
                                                                  [[s] for s in batch], all_positions=full)).cpu()
    labels = (_strings(tokenizer, clean_ids) if at in POSITIONAL else
              [f"head {h}" for h in range(g["heads"])] if at == "attention_heads" else
              [f"expert {e}" for e in range(g["experts"])])
    return PatchingResult(
        at=at, layers=chosen, sites=labels, scores=scores.view(len(chosen), cost.per_layer),
        clean=float(measure(clean_logits)), corrupt=float(measure(corrupt_logits)),
        clean_tokens=_strings(tokenizer, clean_ids), corrupt_tokens=_strings(tokenizer, corrupt_ids),
        answers=None if metric is not None else answers,
        answer_strings=None if metric is not None else tuple(tokenizer.decode([t]) for t in answers),
        cost=cost, figure_fn=figure)


def _number(x) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise PatchingError(f"metric must return a number (a float or a one-element tensor), got {x!r:.80}.") from None
    if not math.isfinite(value):
        raise PatchingError(f"metric returned {value}: it must be finite for every patched run.")
    return value
