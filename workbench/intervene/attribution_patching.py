"""Attribution patching: a first-order estimate of activation patching for every site at once.

    r = s.attribution_patching(clean, corrupt, at="residual")     # or "mlp", "attention_heads", "experts",
    r.scores, r.normalized                                          # or hook point names: "blocks.*.resid_post"

For each site, the metric's gradient on the corrupt run times (clean - corrupt) activation, summed over the site's
values: the linear estimate of what patching that site would do (Nanda 2023; Syed et al. 2023, "Attribution
Patching Outperforms Automated Circuit Discovery"). Two forwards (clean, corrupt) and one backward cover every site,
where true patching needs a forward per site: screen thousands of sites with it, then patch the few that stand out
(`s.patch`). `scores` hold the estimated patched metric (corrupt + estimate), so `normalized` reads as patching's.

Site kinds are patching's (workbench/intervene/patching.py), reached through hook points: residual =
blocks.L.resid_post, mlp = blocks.L.mlp.out, attention_heads = blocks.L.attn.z (summed over positions and the head's
width), experts = blocks.L.mlp.router.logits (one expert's logit, summed over positions). Gradients flow from the
embeddings' output (made a leaf), so no parameter gradient is ever computed or kept. Presets whose weights are not
float (int8, nf4, packed mxfp4) are refused with the reason: there is no gradient through their kernels.
"""
from __future__ import annotations

import re

import torch

from workbench.errors import PatchingError
from workbench.inspect.points import PointSpace
from workbench.inspect.taps import Taps
from workbench.intervene import patching
from workbench.model.adapters import Adapter, input_device

POINT_OF = {"residual": "resid_post", "mlp": "mlp.out", "attention_heads": "attn.z", "experts": "mlp.router.logits"}
KIND_OF = {v: k for k, v in POINT_OF.items()}


def site_kind(at: str, adapter: Adapter) -> tuple[str, list[int] | None]:
    """A patching site kind, or hook point names/patterns of one kind ("blocks.*.attn.z") -> (kind, layers or None)."""
    if at in patching.SITES:
        return patching._check_at(at, adapter), None
    m = re.fullmatch(r"blocks\.([^.]+)\.(.+)", at) if isinstance(at, str) else None
    if not m or m.group(2) not in KIND_OF:
        raise PatchingError(f"at={at!r} is not a site kind: choose one of {', '.join(map(repr, patching.SITES))}, or "
                            f"hook points of one of these kinds: {', '.join('blocks.{L}.' + p for p in POINT_OF.values())}.")
    kind = patching._check_at(KIND_OF[m.group(2)], adapter)
    return kind, None if m.group(1) == "*" else [int(m.group(1))]


def refuse_unless_float(model, preset: str | None) -> None:
    odd = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.dtype.is_floating_point})
    if odd or (preset or "") in ("int8", "nf4", "mxfp4"):
        raise PatchingError(
            f"attribution patching needs gradients through the weights, and this model's preset {preset!r} keeps "
            f"some as {', '.join(odd) or 'quantized tensors'} (no gradient through those kernels). Load it with "
            "preset 'bf16' (or 'cpu' for float32), or use s.patch (forwards only), which works on every preset.")


def attribution_patch(model, tokenizer, adapter: Adapter, clean, corrupt, *, at="residual", metric=None, answers=None,
                      layers=None, preset: str | None = None, figure=None) -> "patching.PatchingResult":
    """Estimated patching scores for every site of kind `at` (see the module docstring); arguments as `patch`."""
    kind, named_layers = site_kind(at, adapter)
    if named_layers is not None:
        if layers is not None:
            raise PatchingError(f"at={at!r} already names its layer: leave layers= out.")
        layers = named_layers
    refuse_unless_float(model, preset)
    if metric is not None and answers is not None:
        raise PatchingError("answers= chooses the tokens of the default metric; with metric= leave answers out.")
    if metric is not None and not callable(metric):
        raise PatchingError(f"metric must be a function of one run's logits [tokens, vocab], not {metric!r}.")
    clean_ids = patching._ids(tokenizer, clean, "clean", model)
    corrupt_ids = patching._ids(tokenizer, corrupt, "corrupt", model)
    patching._check_lengths(tokenizer, clean_ids, corrupt_ids)
    g = patching._geometry(model, adapter)
    chosen = patching._layers(layers, kind, g)
    vocab = int(g["config"].vocab_size)
    space = PointSpace.of(model, adapter)
    points = [space.parse(f"blocks.{layer}.{POINT_OF[kind]}") for layer in chosen]
    device = input_device(model)

    clean_values: dict[str, torch.Tensor] = {}
    with torch.no_grad(), Taps(model, adapter, [(p, _keep(clean_values, detach=True)) for p in points]):
        clean_all = model(input_ids=torch.tensor([clean_ids], device=device), use_cache=False).logits[0].float()
    clean_logits = clean_all[-1]

    corrupt_values: dict[str, torch.Tensor] = {}
    embeddings = model.get_input_embeddings()
    leaf = embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    try:
        with torch.enable_grad(), Taps(model, adapter, [(p, _keep(corrupt_values, detach=False)) for p in points]):
            all_logits = model(input_ids=torch.tensor([corrupt_ids], device=device), use_cache=False).logits[0].float()
            logits = all_logits[-1]
            if answers is not None:
                answers = (patching._answer(tokenizer, answers[0], vocab, "clean"),
                           patching._answer(tokenizer, answers[1], vocab, "corrupt"))
            elif metric is None:
                answers = (int(clean_logits.argmax()), int(logits.detach().argmax()))
                if answers[0] == answers[1]:
                    raise PatchingError(
                        f"clean and corrupt both predict {tokenizer.decode([answers[0]])!r} next, so the default "
                        "metric (the logit difference between their answers) is 0 everywhere: pass answers=, metric=, "
                        "or prompts whose next tokens differ.")
            if metric is None:
                value = logits[answers[0]] - logits[answers[1]]
                clean_metric = float(clean_logits[answers[0]] - clean_logits[answers[1]])
            else:
                value = metric(all_logits)
                if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
                    raise PatchingError("for attribution patching, metric must return a one-element tensor computed "
                                        "from the logits it is given (so it has a gradient), not a plain number.")
                value = value.reshape(())
                clean_metric = patching._number(metric(clean_all))
            grads = torch.autograd.grad(value, [corrupt_values[p.name] for p in points], allow_unused=True)
    finally:
        leaf.remove()
    corrupt_metric = float(value.detach())
    rows = []
    for p, grad in zip(points, grads):
        diff = clean_values[p.name].float() - corrupt_values[p.name].detach().float()
        product = torch.zeros_like(diff) if grad is None else grad.float() * diff
        if kind in patching.POSITIONAL:          # [1, T, d] -> [T]
            rows.append(product[0].sum(-1))
        elif kind == "attention_heads":          # [1, T, H, hd] -> [H]
            rows.append(product[0].sum(dim=(0, 2)))
        else:                                    # router logits [T, E] -> [E]
            rows.append(product.sum(0))
    scores = corrupt_metric + torch.stack(rows).cpu()
    cost = patching._cost(model, adapter, kind, chosen, len(clean_ids), scores.numel(), g)
    labels = (patching._strings(tokenizer, clean_ids) if kind in patching.POSITIONAL else
              [f"head {h}" for h in range(g["heads"])] if kind == "attention_heads" else
              [f"expert {e}" for e in range(g["experts"])])
    return patching.PatchingResult(
        at=kind, layers=chosen, sites=labels, scores=scores, clean=clean_metric, corrupt=corrupt_metric,
        clean_tokens=patching._strings(tokenizer, clean_ids), corrupt_tokens=patching._strings(tokenizer, corrupt_ids),
        answers=None if metric is not None else answers,
        answer_strings=None if metric is not None else tuple(tokenizer.decode([t]) for t in answers),
        cost=cost, figure_fn=figure, method="attribution")


def _keep(store: dict, detach: bool):
    def fn(x, hook):
        if detach:
            store[hook.name] = x.detach().clone()
            return None
        # Hand the model a copy and keep that: the gradient is then taken with respect to exactly the tensor the
        # rest of the forward consumes (a view made inside a hook, like attn.z's per-head split, is not).
        store[hook.name] = y = x.clone()
        return y
    return fn
