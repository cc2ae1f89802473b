"""Side by side: what interventions do to a generation, its next-token distributions and its routing.

    r = compare(s, wb.user("Why is the sky blue?"),
                interventions=[ablate_experts(s, {3: [7]}), [force_experts(s, ...), ablate_heads(s, ...)]])
    r.texts["baseline"], r.texts[r.labels[1]]   # each variant's own (greedy) generation
    r.kl[r.labels[1]]                           # [completion tokens] KL(baseline || variant), nats
    r.routing_diff(r.labels[1])                 # share of (layer, token) whose expert set changed

Every variant generates on its own (greedy by default). KL and routing are *teacher-forced*: one forward over
prompt + the baseline's completion, without and with the variant, so every variant is measured on the same
tokens. KL at completion token j compares the distributions that predicted token j: KL(p_baseline || p_variant),
≥ 0, and exactly 0 for a variant that changes nothing. The routing diff is over all tokens of that sequence
(prompt included) and every routed layer, as `s.trace(baseline_generation)` inside the variant would show it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html

import torch

from workbench.chat import inputs as input_rule
from workbench.errors import InterventionError
from workbench.inspect.routing import routed_forward
from workbench.intervene.interventions import Intervention
from workbench.metrics import kl_divergence
from workbench.model.adapters import input_device, text_config


@dataclasses.dataclass
class Comparison:
    labels: list[str]                         # "baseline" first, then one label per variant
    prompt_ids: list[int]
    generations: dict                         # label -> Generation
    tokens: list[str]                         # the baseline completion, the tokens KL is measured on
    kl: dict[str, torch.Tensor]               # label -> [len(tokens)] float32, nats
    routing_layers: list[int]                 # rows of routing_changed (empty for a dense model)
    routing_changed: dict[str, torch.Tensor | None]  # label -> [routed layers, prompt + completion] bool

    @property
    def texts(self) -> dict[str, str]:
        return {label: g.text for label, g in self.generations.items()}

    def routing_diff(self, label: str) -> float | None:
        """Share of (routed layer, token) pairs whose set of experts differs from the baseline's."""
        changed = self.routing_changed[label]
        return None if changed is None or changed.numel() == 0 else float(changed.float().mean())

    def summary(self) -> list[dict]:
        return [{"variant": label, "text": self.texts[label],
                 "mean_kl": float(self.kl[label].mean()) if self.kl[label].numel() else 0.0,
                 "max_kl": float(self.kl[label].max()) if self.kl[label].numel() else 0.0,
                 "routing_changed": self.routing_diff(label)} for label in self.labels]

    def __repr__(self) -> str:
        rows = []
        for r in self.summary():
            routing = "-" if r["routing_changed"] is None else f"{r['routing_changed']:.1%}"
            rows.append(f"  {r['variant']}: mean KL {r['mean_kl']:.4f}, routing changed {routing}, "
                        f"text {r['text'][:50]!r}")
        return "Comparison(\n" + "\n".join(rows) + "\n)"

    def _repr_html_(self) -> str:
        head = "<tr><th>variant</th><th>text</th><th>mean KL</th><th>max KL</th><th>routing changed</th></tr>"
        rows = "".join(
            f"<tr><td><b>{html.escape(r['variant'])}</b></td>"
            f"<td style='white-space:pre-wrap;text-align:left'>{html.escape(r['text'])}</td>"
            f"<td>{r['mean_kl']:.4f}</td><td>{r['max_kl']:.4f}</td>"
            f"<td>{'-' if r['routing_changed'] is None else format(r['routing_changed'], '.1%')}</td></tr>"
            for r in self.summary())
        return f"<table>{head}{rows}</table>"


def compare(session, prompt, interventions, *, max_new_tokens: int = 32, temperature: float = 0.0,
            seed: int = 0, **chat_kwargs) -> Comparison:
    """Generate without and with each variant, and measure per-token KL and routing on the baseline's tokens.

    prompt, by the input rule (workbench.chat.inputs): raw text is continued as it is; wb.user(text) or chat
    messages are a chat turn, rendered as `s.chat` renders it (the rendering keywords reasoning_effort, system,
    developer, tools, renderer apply to messages); token ids as they are; a Generation's prompt is generated afresh.
    interventions: a list whose items are an intervention or a list of interventions applied together (one
    variant each), or a dict {label: intervention or list}. An empty list is a variant that changes nothing.
    Other chat_kwargs (top_p, stop_tokens, ...) go to `session.chat`; sampling is greedy unless `temperature` > 0,
    with the same `seed` for every variant.
    """
    variants = _variants(interventions)
    rendering = {k: chat_kwargs.pop(k) for k in RENDER_KEYWORDS if chat_kwargs.get(k) is not None}
    prompt_ids = _prompt_ids(session, prompt, rendering)
    kwargs = dict(chat_kwargs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    baseline = session.chat(prompt_ids, **kwargs)
    ids = list(baseline.prompt_ids) + list(baseline.token_ids)
    n = len(baseline.token_ids)
    base_logp, base_routing = _teacher_forced(session, ids, n)
    generations, kl, changed = {"baseline": baseline}, {"baseline": torch.zeros(n)}, {}
    layers = sorted(base_routing) if base_routing is not None else []
    changed["baseline"] = torch.zeros(len(layers), len(ids), dtype=torch.bool) if base_routing is not None else None
    for label, group in variants:
        with contextlib.ExitStack() as stack:
            for intervention in group:
                stack.enter_context(intervention)
            generations[label] = session.chat(prompt_ids, **kwargs)
            logp, routing = _teacher_forced(session, ids, n)
        kl[label] = kl_divergence(base_logp, logp)
        changed[label] = None if routing is None else torch.stack(
            [(routing[i].sort(-1).values != base_routing[i].sort(-1).values).any(-1) for i in layers])
    return Comparison(labels=["baseline"] + [label for label, _ in variants], prompt_ids=list(baseline.prompt_ids),
                      generations=generations, tokens=list(baseline.tokens), kl=kl, routing_layers=layers,
                      routing_changed=changed)


RENDER_KEYWORDS = ("reasoning_effort", "system", "developer", "tools", "renderer")


def _prompt_ids(session, prompt, rendering: dict) -> list[int]:
    """The prompt's token ids by the input rule; rendering keywords only where there is a conversation to render."""
    if isinstance(prompt, input_rule.Conversation) or input_rule.is_messages(prompt):
        return session.render(prompt, **rendering)  # keywords may add to a wb.user turn's options, not contradict them
    if rendering:
        said = ", ".join(f"{k}={v!r}" for k, v in rendering.items())
        if isinstance(prompt, str):
            raise InterventionError(f"{said} renders a chat turn, but a string is raw text here: write "
                                    f"s.compare(wb.user({prompt!r:.40}, {said}), ...) to compare chat answers.")
        raise InterventionError(f"{said} renders a chat turn: give it inside wb.user(text, ...) or pass messages, "
                                f"not {input_rule.describe(prompt)}.")
    if input_rule.is_generation(prompt):
        return list(prompt.prompt_ids)
    vocab = getattr(text_config(session.model.config), "vocab_size", None)
    return input_rule.token_ids(session.tokenizer, prompt, error=InterventionError, where="compare's prompt",
                                vocab_size=vocab)[0]


def _variants(interventions) -> list[tuple[str, list[Intervention]]]:
    items = list(interventions.items()) if isinstance(interventions, dict) else [(None, v) for v in interventions]
    out, seen = [], {"baseline"}
    for label, group in items:
        group = list(group) if isinstance(group, (list, tuple)) else [group]
        for x in group:
            if not isinstance(x, Intervention):
                raise InterventionError(f"compare takes interventions (ablate_experts(s, ...), ...), not {x!r}.")
        if label == "baseline":
            if group:  # the name of the unmodified run: a changed run under that name would mislabel both
                raise InterventionError("'baseline' names the run without interventions, which compare always "
                                        f"makes: call the variant {group!r} something else.")
            continue  # the user's own baseline is the built-in one: not run twice, not renamed
        label = label or (" + ".join(map(repr, group)) if group else "no intervention")
        base, i = label, 2
        while label in seen:
            label, i = f"{base} #{i}", i + 1
        seen.add(label)
        out.append((label, group))
    return out


def _teacher_forced(session, ids: list[int], n: int):
    """log-probabilities [n, vocab] (float32) that predicted the last n tokens, and routing {layer: [T, k]}."""
    model, adapter = session.model, session.adapter
    x = torch.tensor([ids], device=input_device(model))
    out, routed = routed_forward(model, adapter, input_ids=x, use_cache=False, logits_to_keep=n + 1)
    routing = {layer: r.indices.cpu() for layer, r in routed.items()} if adapter.is_moe else None
    logits = out.logits[0, :-1].float()  # position i predicts token i + 1: drop the one after the last
    return logits.log_softmax(-1).cpu(), routing
