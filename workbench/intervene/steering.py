"""Residual steering vectors: add a direction to the residual stream at one layer, inside a `with` block.

    v = steering_vector(s, ["I love this", ...], ["I hate this", ...], layer=3)   # mean difference
    with steer(s, v, layer=3, scale=4.0):                    # every position, every forward
        g = s.chat("Tell me about your day")
    with steer(s, v, layer=3, scale=4.0, channels=["final"]):  # harmony: only while writing the answer
        g = s.chat("...", reasoning_effort="low")               # the analysis channel is left untouched

Where: `scale * vector` is added to the output of decoder layer `layer`, the residual stream that
`t.residual(layer)` reads, so a trace inside the block records the steered stream.

Channels (harmony models): a position is steered when, after its token, the model is writing the content
of an assistant message on one of `channels`; its output then predicts a token of that channel. While
generating, that is read from the live parser of the run (the prompt's prefill is never steered); on any
other forward (a trace, a capture) it is read by parsing the forward's own token ids, so tracing a steered
Generation steers exactly the positions the generation steered.
"""
from __future__ import annotations

import hashlib
import math

import torch

from workbench.chat import harmony as chat
from workbench.chat import inputs as input_rule
from workbench.errors import InterventionError
from workbench.intervene.interventions import Intervention


def writing_channels(tokenizer, ids) -> list[str | None]:
    """Per position of a harmony token sequence: the channel of the assistant message whose content the model
    is writing after that token (None in headers, in other roles' messages, and after a message ends)."""
    parser = chat.HarmonyStreamParser(tokenizer)
    out = []
    for token in ids:
        parser.feed(int(token))
        message = parser.message
        out.append(message.get("channel") or "final"
                   if message is not None and message.get("role") == "assistant" else None)
    return out


class steer(Intervention):
    """`with steer(s, vector, layer, scale=1.0, channels=None):` adds `scale * vector` to the residual stream
    after decoder layer `layer` (negative counts from the last layer). `channels` (harmony models): steer only
    positions where the model writes one of these channels (e.g. ["final"]); None steers every position."""

    name = "steer"
    example = "steer(s, vector, layer=3, scale=4.0)"

    def __init__(self, session, vector, layer: int, scale: float = 1.0, channels=None):
        self.vector, self.scale, self.channels = vector, scale, channels
        super().__init__(session, {layer: vector})

    def _check(self, spec):
        (layer, vector), = spec.items()
        layer = self._layer(layer)
        hidden = int(self.config.hidden_size)
        if not isinstance(vector, torch.Tensor):
            try:
                vector = torch.as_tensor(vector, dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise InterventionError(f"steering vector must be a tensor of {hidden} numbers, not "
                                        f"{type(vector).__name__}") from e
        vector = vector.detach().reshape(-1) if vector.dim() > 1 and vector.shape[0] == 1 else vector.detach()
        if vector.dim() != 1 or vector.shape[0] != hidden:
            raise InterventionError(f"steering vector has shape {tuple(vector.shape)}, but the residual stream of "
                                    f"this model is {hidden} wide: give a vector of shape ({hidden},) (e.g. from "
                                    "steering_vector(s, positive, negative, layer)).")
        if not torch.isfinite(vector).all():
            raise InterventionError("steering vector has NaN or infinite entries.")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise InterventionError(f"scale must be a finite number, got {self.scale!r}.")
        if self.channels is not None:
            if not chat.is_harmony(self.session.tokenizer):
                raise InterventionError("channels= needs a harmony model (gpt-oss): this model writes one stream, "
                                        "so steer every position (channels=None).")
            channels = [self.channels] if isinstance(self.channels, str) else list(self.channels)
            bad = [c for c in channels if c not in ("analysis", "commentary", "final")]
            if bad or not channels:
                raise InterventionError(f"channels={self.channels!r}: choose among 'analysis', 'commentary', 'final'.")
            self.channels = channels
        self.vector, self.layer = vector, layer
        return {layer: float(self.scale)}

    def describe(self) -> dict:
        v = self.vector.float()
        return {"name": self.name, "layer": self.layer, "scale": float(self.scale), "channels": self.channels,
                "vector_norm": float(v.norm()), "vector_sha256": hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16]}

    def __repr__(self) -> str:
        where = "" if self.channels is None else f", channels={self.channels}"
        return f"steer(layer={getattr(self, 'layer', '?')}, scale={self.scale}, |v|={float(self.vector.norm()):.3g}{where})"

    def _install(self) -> None:
        module = self.adapter.layer_list(self.model)[self.layer]
        ids: list = [None]  # the token ids of the forward in progress (for channel masks outside generation)
        if self.channels is not None:
            grab = self.model.register_forward_pre_hook(lambda m, a, kw: ids.__setitem__(0, kw.get(
                "input_ids", a[0] if a else None)), with_kwargs=True)
            self._undo.append(grab.remove)
        handle = module.register_forward_hook(lambda m, args, out: self._add(out, ids[0]))
        self._undo.append(handle.remove)

    def _add(self, output, input_ids):
        hidden = output[0] if isinstance(output, tuple) else output
        delta = (self.scale * self.vector).to(hidden.device, hidden.dtype)
        mask = self._mask(hidden, input_ids)
        steered = hidden + delta if mask is None else hidden + delta * mask.to(hidden.device, hidden.dtype)
        return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered

    def _mask(self, hidden: torch.Tensor, input_ids) -> torch.Tensor | None:
        """[batch, tokens, 1] of 0/1: which positions to steer (None: all)."""
        if self.channels is None:
            return None
        b, t = hidden.shape[0], hidden.shape[1]
        live = self.session.writing_channel() if hasattr(self.session, "writing_channel") else False
        if live is not False:  # inside a generation: the prefill is never steered, a decode step by the parser
            on = t == 1 and live in self.channels
            return torch.full((b, t, 1), float(on))
        if input_ids is None:
            raise InterventionError("channel-limited steering needs the forward's input_ids (not inputs_embeds).")
        rows = [[c in self.channels for c in writing_channels(self.session.tokenizer, row.tolist())]
                for row in input_ids.reshape(b, -1)]
        return torch.tensor(rows, dtype=torch.float32)[..., None]


def steering_vector(session, positive, negative, layer: int, *, position: str = "last") -> torch.Tensor:
    """Mean difference of the residual stream after `layer` between `positive` and `negative` inputs (one or a list
    of: raw text, wb.user(text) chat turns, chat messages, Generations or token ids; the input rule of
    workbench.chat.inputs): at each input's last token (position="last") or averaged over its tokens
    (position="mean"). float32, shape (hidden,). To steer chat answers, build it from chat turns (wb.user), so the
    vector is measured where it will be applied."""
    if position not in ("last", "mean"):
        raise InterventionError(f"position={position!r}: choose 'last' or 'mean'.")
    def inputs(x, name: str) -> list:
        if isinstance(x, (list, tuple)) and not x:
            raise InterventionError(f"steering_vector needs at least one {name} input; {name} is an empty list.")
        return input_rule.items(x, error=InterventionError, where=f"steering_vector's {name} inputs")[1]

    positive, negative = inputs(positive, "positive"), inputs(negative, "negative")

    def mean(prompts) -> torch.Tensor:
        rows = []
        for p in prompts:
            point = f"blocks.{layer}.resid_post"
            r = session.trace(p, what=[point], dtype=torch.float32)[point]
            rows.append(r[-1] if position == "last" else r.mean(0))
        return torch.stack(rows).mean(0)

    return mean(positive) - mean(negative)
