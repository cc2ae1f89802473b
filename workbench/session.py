"""The facade: `load` a model into a Session, and one method per thing a user does with it.

The layers below know nothing of the Session (model → chat → inspect → intervene → analysis → views → ui);
it only wires them together, and holds the one lock that keeps a generation and a capture from overlapping.

Why one module of about 440 lines: the facade has one short method per thing a user does, with its signature and
docstring (Shift-Tab shows them); its length is the breadth of the API, each method only wires a layer below.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from typing import TYPE_CHECKING, Any

from workbench.chat import generation
from workbench.chat import harmony as chat_format
from workbench.chat import inputs as input_rule
from workbench import arguments
from workbench.errors import BusyError, ChatError, SamplingError, WorkbenchError
from workbench.model import hardware, planning, sources
from workbench.model.adapters import Adapter, text_config
from workbench.model.loading import LoadedModel, load_model
from workbench.model.report import LoadReport

if TYPE_CHECKING:
    from workbench.inspect.trace import Trace

GPT_OSS_20B = "openai/gpt-oss-20b"
_CHAT_KEYWORDS = ("reasoning_effort", "system", "developer", "tools", "renderer", "stop_tokens", "temperature", "top_p",
                  "top_k", "max_new_tokens", "seed", "top_alternatives")


def load(model: Any, preset: str = "auto", *, check_fit: bool = True, attn_implementation: str | None = None,
         offload_folder: str | None = None, trust_remote_code: bool = False, context_tokens: int = 4096,
         quantize_router: bool = False, expert_cache: Any = None, check_weights: bool = True) -> "Session":
    """Load a causal LM (hub id, local folder or .gguf file) with a named preset; returns a Session.

    Checks the preset and the memory plan before any weight is read, so an impossible request fails fast
    with a message that says what would work (see workbench.model.loading.load_model for each keyword).
    """
    return Session.from_loaded(load_model(
        model, preset, check_fit=check_fit, attn_implementation=attn_implementation, offload_folder=offload_folder,
        trust_remote_code=trust_remote_code, context_tokens=context_tokens, quantize_router=quantize_router,
        expert_cache=expert_cache, check_weights=check_weights))


DEFAULT_KINDS = {
    "chat": "a real small instruct model to chat with (SmolLM2-135M-Instruct)",
    "attention": "a real small dense model whose attention means something (SmolLM2-135M-Instruct)",
    "moe": "gpt-oss-nano: a trained tiny gpt-oss (routing, sinks, harmony, mxfp4 on a CPU)",
    "routing": "the same as 'moe'",
}


def _resid_post_layer(layer, at, where: str) -> int:
    """`layer=L` or `at="blocks.L.resid_post"` (one of them): the decoder layer whose output a tool reads or changes."""
    if at is None:
        if layer is None:
            raise WorkbenchError(f"{where} needs a layer: layer=L or at='blocks.L.resid_post'.")
        return layer
    m = re.fullmatch(r"blocks\.(-?\d+)\.resid_post", at) if isinstance(at, str) else None
    if layer is not None or not m:
        raise WorkbenchError(f"{where}: give layer=L or at='blocks.L.resid_post' (the residual stream after a layer), "
                             f"not {'both' if layer is not None and m else repr(at)}; to change another point use "
                             "s.set(name, fn).")
    return int(m.group(1))


def default_model(kind: str = "chat") -> str:
    """The model a notebook should use here: gpt-oss-20b on a GPU that fits it, else an offline model of `kind`
    (see DEFAULT_KINDS: "chat", "attention", "moe"/"routing")."""
    if kind not in DEFAULT_KINDS:
        raise WorkbenchError(f"default_model({kind!r}): unknown kind. Kinds: " +
                             "; ".join(f"{k!r}: {v}" for k, v in DEFAULT_KINDS.items()) + ".")
    if hardware.gpus():
        try:
            sources.resolve(GPT_OSS_20B)  # cached, or the hub is reachable
            preset, _ = planning.choose_auto(GPT_OSS_20B)
            if preset in ("mxfp4", "bf16"):
                return GPT_OSS_20B
        except Exception:  # no weights reachable or no fit: fall back to the offline models
            pass
    from workbench import fixtures

    if kind in ("moe", "routing"):
        return str(fixtures.nano_path())
    return str(fixtures.smollm2_path())


@dataclasses.dataclass
class Session:
    model: Any
    tokenizer: Any
    adapter: Adapter
    report: LoadReport
    plan: Any = None
    source: Any = None
    _busy: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    # Interventions, steering and hooks active now, outermost first: traces taken inside record them.
    active_interventions: list = dataclasses.field(default_factory=list, repr=False)
    _writing: Any = dataclasses.field(default=None, repr=False)  # the parser of the generation running now
    _doing: str | None = dataclasses.field(default=None, repr=False)  # what holds the lock now, for BusyError

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> "Session":
        return cls(model=loaded.model, tokenizer=loaded.tokenizer, adapter=loaded.adapter, report=loaded.report,
                   plan=loaded.plan, source=loaded.source)

    # ---- one thing at a time ----
    @property
    def busy(self) -> bool:
        """Whether a generation (or a capture) is running on this session now."""
        return self._busy.locked()

    def wait_idle(self) -> None:
        """Wait until nothing runs on the session (polling, so Ctrl-C still works)."""
        while not self._busy.acquire(timeout=0.1):
            pass
        self._busy.release()

    @contextlib.contextmanager
    def exclusive(self, doing: str):
        """`with s.exclusive("counting routing"):` nothing else runs on the session inside; BusyError if something
        does now. A capture switches the model's attention implementation: a generation running meanwhile would
        go through it (and be recorded), so the two never overlap."""
        if not self._busy.acquire(blocking=False):
            raise BusyError(self._busy_message(doing))
        self._doing = doing
        try:
            yield
        finally:
            self._doing = None
            self._busy.release()

    @property
    def harmony(self) -> bool:
        return chat_format.is_harmony(self.tokenizer)

    def render(self, prompt, *, reasoning_effort: str | None = None, system: str | None = None,
               developer: str | None = None, tools: list | None = None, renderer: str | None = None) -> list[int]:
        """Token ids the model sees for a prompt: a string is the user's turn; chat messages, wb.user(...) (its own
        rendering options; the keywords here may add to them, not contradict them), or token ids as-is.

        `renderer="harmony"` renders with openai-harmony instead of the model's chat template (gpt-oss only).
        """
        if isinstance(prompt, input_rule.Conversation):
            given = {"reasoning_effort": reasoning_effort, "system": system, "developer": developer, "tools": tools}
            for key, value in prompt.options().items():
                if value is not None and given[key] is not None and given[key] != value:
                    raise ChatError(f"{key}={given[key]!r} here, but the wb.user(...) turn says {key}={value!r}: say "
                                    "it once.")
                given[key] = given[key] if given[key] is not None else value
            reasoning_effort, system, developer, tools = (given[k] for k in ("reasoning_effort", "system",
                                                                              "developer", "tools"))
            prompt = list(prompt.messages)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = getattr(text_config(self.model.config), "vocab_size", None)
            return arguments.token_ids(prompt, vocab, ChatError, "the prompt")
        for name, value in (("system", system), ("developer", developer), ("reasoning_effort", reasoning_effort),
                            ("renderer", renderer)):
            arguments.optional_text(value, name, ChatError)
        return chat_format.render(self.tokenizer, chat_format.as_messages(prompt), reasoning_effort=reasoning_effort,
                                  system=system, developer=developer, tools=tools, renderer=renderer)

    def stream(self, prompt, *, reasoning_effort: str | None = None, system: str | None = None,
               developer: str | None = None, tools: list | None = None, renderer: str | None = None,
               stop_tokens: list[int] | None = None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               max_new_tokens: int = 1024, seed: int | None = None, top_alternatives: int = 5,
               **unknown) -> "generation.GenerationRun":
        """Start generating in a background thread; iterate for `Delta`s (text + channel), `.stop()` to end.

        A string is the user's turn (use `render`/`trace` for raw text). Sampling: temperature (0 = greedy), top_p,
        top_k (0 = off), max_new_tokens, seed, top_alternatives (alternatives recorded per step).
        `stop_tokens`: ids that end the answer (default: the model's own, e.g. harmony's <|return|> and <|call|>);
        `[]` always writes max_new_tokens.
        """
        arguments.unknown_keywords(unknown, _CHAT_KEYWORDS, "stream/chat", SamplingError)
        params = generation.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                           max_new_tokens=max_new_tokens, seed=seed, top_alternatives=top_alternatives)
        params.validate()
        prompt_ids = self.render(prompt, reasoning_effort=reasoning_effort, system=system, developer=developer,
                                 tools=tools, renderer=renderer)
        if not self._busy.acquire(blocking=False):
            raise BusyError(self._busy_message("generating"))
        parser = chat_format.make_parser(self.tokenizer)
        self._writing = parser
        self._doing = "a generation"
        try:
            run = generation.start(self.model, self.tokenizer, prompt_ids, params, parser, stop_token_ids=stop_tokens)
        except BaseException:
            self._writing = None
            self._doing = None
            self._busy.release()
            raise
        run.on_finish(self._finished)
        return run

    def _finished(self) -> None:
        self._writing = None
        self._doing = None
        self._busy.release()

    def _busy_message(self, doing: str) -> str:
        running = self._doing or "a generation"
        if running == "a generation":
            return (f"a generation is running on this session (s.stream / s.chat): stop it (run.stop()) or wait for "
                    f"it before {doing}.")
        return f"{running} is running on this session: wait for it to finish (it returns on its own) before {doing}."

    def writing_channel(self):
        """While a generation runs: the channel whose content the model is writing now (None in a header);
        False when no generation runs. Channel-limited steering reads it."""
        parser = self._writing
        if parser is None:
            return False
        message = getattr(parser, "message", None)
        if message is None or message.get("role", "assistant") != "assistant":
            return None
        return message.get("channel") or "final"

    def provenance(self) -> list[dict]:
        """What is active now (interventions, steering, hooks), as traces record it."""
        return [x.describe() for x in self.active_interventions]

    def chat(self, prompt, *, reasoning_effort: str | None = None, system: str | None = None,
             developer: str | None = None, tools: list | None = None, renderer: str | None = None,
             stop_tokens: list[int] | None = None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             max_new_tokens: int = 1024, seed: int | None = None, top_alternatives: int = 5,
             **unknown) -> "generation.Generation":
        """Generate a whole answer to a user turn (a string) or a conversation; returns a Generation (text, channels,
        token ids, logprobs, alternatives). Keywords as `stream`. Ctrl-C stops the generation and frees the session."""
        arguments.unknown_keywords(unknown, _CHAT_KEYWORDS, "chat", SamplingError)
        run = self.stream(prompt, reasoning_effort=reasoning_effort, system=system, developer=developer, tools=tools,
                          renderer=renderer, stop_tokens=stop_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, top_alternatives=top_alternatives)
        try:
            return run.result()
        except BaseException:  # KeyboardInterrupt included: no run was returned, so nobody else could stop it
            run.stop()
            self.wait_idle()
            raise

    def trace(self, inputs, *, what=None, layers=None, heads=None, budget="2GB", dtype=None,
              allow_longer: bool = False) -> "Trace":
        """One forward over a Generation, text, chat messages or token ids, recording what `what` asks: hook point
        names or patterns ("blocks.*.resid_post", "blocks.1.mlp.experts.*.act"; s.points() lists them) and/or the
        groups "routing", "attention", "residuals" (default: routing and attention). Read it with t[name].

        Tracing a Generation replays prompt + completion in a single forward: by causality every token
        sees exactly what it saw while being generated. An input past the model's context is refused unless
        allow_longer=True.
        """
        from workbench.inspect import capture as tracing

        with self.exclusive("tracing"):
            return tracing.trace(self.model, self.tokenizer, self.adapter, inputs, what=what, layers=layers,
                                 heads=heads, budget=budget, dtype=dtype, preset=self.report.preset,
                                 provenance=self.provenance(), allow_longer=allow_longer)

    @contextlib.contextmanager
    def capture(self, *, what=None, layers=None, heads=None, dtype=None, budget=None):
        """`with s.capture(...) as cap: s.model(...)`, then `cap.trace(s.tokenizer)`."""
        from workbench.inspect.capture import capture

        with self.exclusive("capturing"), capture(self.model, self.adapter, what=what, layers=layers, heads=heads,
                                                   dtype=dtype, budget=budget) as cap:
            cap.provenance = self.provenance()
            yield cap

    # ---- interventions: context managers that change the model only inside `with` ----
    def ablate_experts(self, experts: dict, mode: str = "reroute"):
        """`with s.ablate_experts({layer: [experts]}):` never chosen there; top-k over the rest (mode="reroute").
        mode="zero": chosen as before, their output zeroed, so their weight goes to nobody."""
        from workbench.intervene import interventions

        return interventions.ablate_experts(self, experts, mode=mode)

    def replay_routing(self, trace: "Trace", layers=None, weights: bool = True):
        """`with s.replay_routing(t):` every token gets the experts (and, with weights=True, the weights) trace `t`
        recorded, at every routed layer or `layers`; forwards over other tokens are refused."""
        from workbench.intervene.replay import replay_routing

        return replay_routing(self, trace, layers=layers, weights=weights)

    # ---- hook points: one vocabulary for reading and changing (README, 'Hook points') ----
    def points(self, pattern: str | None = None) -> list[str]:
        """This model's hook point names (all, or those matching a pattern such as "blocks.0.*")."""
        from workbench.inspect.points import PointSpace

        space = PointSpace.of(self.model, self.adapter)
        return space.names() if pattern is None else [p.name for p in space.resolve(pattern)]

    def set(self, at, value):
        """`with s.set("blocks.2.resid_post", value):` a point (or a pattern's points) replaced by a tensor
        (per-sequence shape, broadcast) or by fn(value, hook) -> tensor."""
        from workbench.intervene.point_interventions import set_point

        return set_point(self, at, value)

    def ablate(self, at, mode: str = "zero", reference=None):
        """`with s.ablate("blocks.1.mlp.out"):` zero-ablation; mode="mean", reference=[texts]: their mean there."""
        from workbench.intervene.point_interventions import ablate_point

        return ablate_point(self, at, mode=mode, reference=reference)

    def force_experts(self, experts: dict):
        """`with s.force_experts({layer: [k experts]}):` exactly those, weighted by the router over their logits."""
        from workbench.intervene import interventions

        return interventions.force_experts(self, experts)

    def steer_experts(self, deltas: dict):
        """`with s.steer_experts({layer: {expert: amount}}):` added to those router logits."""
        from workbench.intervene import interventions

        return interventions.steer_experts(self, deltas)

    def ablate_heads(self, heads: dict):
        """`with s.ablate_heads({layer: [heads]}):` those heads' outputs zeroed before o_proj."""
        from workbench.intervene import interventions

        return interventions.ablate_heads(self, heads)

    def scale_sinks(self, factors: dict):
        """`with s.scale_sinks({layer: factor}):` gpt-oss attention-sink logits multiplied by factor."""
        from workbench.intervene import interventions

        return interventions.scale_sinks(self, factors)

    def steer(self, vector, layer: int | None = None, scale: float = 1.0, channels=None, *, at: str | None = None):
        """`with s.steer(vector, layer, scale=4.0, channels=None):` adds scale * vector to the residual stream after
        `layer` (`at="blocks.L.resid_post"` says the same by hook point name); channels=["final"] (harmony) steers only
        while the model writes the answer. Other points: `s.set(name, lambda v, hook: v + scale * vector)`."""
        from workbench.intervene import steering

        layer = _resid_post_layer(layer, at, "steer")
        return steering.steer(self, vector, layer, scale=scale, channels=channels)

    def steering_vector(self, positive, negative, layer: int, *, position: str = "last"):
        """Mean difference of residuals after `layer` between positive and negative prompts (float32)."""
        from workbench.intervene import steering

        return steering.steering_vector(self, positive, negative, layer, position=position)

    def hook(self, at: str, fn):
        """`with s.hook("blocks.3.attn.z", fn):` fn(value, hook) at a hook point (or a pattern's points); a non-None
        return value replaces the value. `s.points()` lists them. A module path (`"model.layers.3.mlp"`, see
        `s.modules()`) instead attaches fn(module, args, output) after that module's forward."""
        from workbench.intervene import hooks
        from workbench.intervene.point_interventions import tap

        if isinstance(at, str) and (at == "logits" or at.startswith("blocks.")):
            return tap(self, at, fn)
        return hooks.hook(self, at, fn)

    def modules(self, contains: str | None = None) -> list[str]:
        """Module paths `hook` takes, optionally those containing `contains`."""
        from workbench.intervene import hooks

        return hooks.module_names(self.model, contains)

    def compare(self, prompt, interventions, *, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                reasoning_effort: str | None = None, system: str | None = None, developer: str | None = None,
                tools: list | None = None, renderer: str | None = None, **chat_kwargs):
        """Texts, per-token KL (teacher-forced on the baseline's tokens) and routing diff per variant. A string
        prompt is raw text; wb.user(text) (or messages) is a chat turn, rendered with the keywords given here.
        Other keywords (top_p, stop_tokens, ...) go to s.chat. See workbench/intervene/compare.py."""
        from workbench.intervene import compare as comparing

        return comparing.compare(self, prompt, interventions, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed, reasoning_effort=reasoning_effort, system=system, developer=developer,
                                 tools=tools, renderer=renderer, **chat_kwargs)

    def routing_stats(self, texts, *, batch_size: int = 8, max_tokens: int = 512, checkpoint=None,
                      checkpoint_every: int = 20, progress: bool = True, text_key: str = "text",
                      token_table: bool = True, bins: int | None = None):
        """Routing aggregates over a corpus (strings are raw text; wb.user(...) chat turns; row dicts read
        `text_key`), streamed in right-padded batches (expert load, co-activation, token -> expert table, router
        entropy); resumable with checkpoint=. See workbench/analysis/routing_stats.py."""
        from workbench.analysis import routing_stats as counting

        return counting.routing_stats(self, texts, batch_size=batch_size, max_tokens=max_tokens, checkpoint=checkpoint,
                                      checkpoint_every=checkpoint_every, progress=progress, text_key=text_key,
                                      token_table=token_table, bins=counting.BINS if bins is None else bins)

    def widget(self, **defaults):
        """An ipywidgets generation widget with a token inspector (see workbench.widget)."""
        from workbench.ui.widget import widget

        return widget(self, **defaults)

    def patch(self, clean, corrupt, *, at: str = "residual", metric=None, answers=None, layers=None,
              batch_size: int = 8, budget="2GB", dry_run: bool = False):
        """Activation patching: the corrupt run with each site (layer x position/head/expert) set to its clean
        value, one metric per site. dry_run=True returns the cost (forwards, bytes) without running.
        See workbench/intervene/patching.py."""
        from workbench.intervene import patching
        from workbench.views.patching import patching_heatmap

        from workbench.intervene.attribution_patching import site_kind

        kind, named_layers = site_kind(at, self.adapter)  # a site kind, or hook points: "blocks.*.attn.z"
        if named_layers is not None:
            if layers is not None:
                raise patching.PatchingError(f"at={at!r} already names its layer: leave layers= out.")
            layers = named_layers
        at = kind
        with self.exclusive("patching"):
            return patching.patch(self.model, self.tokenizer, self.adapter, clean, corrupt, at=at, metric=metric,
                                  answers=answers, layers=layers, batch_size=batch_size, budget=budget,
                                  dry_run=dry_run, figure=patching_heatmap)

    def attribution_patching(self, clean, corrupt, *, at="residual", metric=None, answers=None, layers=None):
        """Gradient x (clean - corrupt) at every site of a kind (or hook points like "blocks.*.attn.z") in two
        forwards and one backward: a first-order estimate of `patch`, for screening many sites before patching a
        few. Float weights only (see workbench/intervene/attribution_patching.py)."""
        from workbench.intervene.attribution_patching import attribution_patch
        from workbench.views.patching import patching_heatmap

        with self.exclusive("attribution patching"):
            return attribution_patch(self.model, self.tokenizer, self.adapter, clean, corrupt, at=at, metric=metric,
                                     answers=answers, layers=layers, preset=self.report.preset, figure=patching_heatmap)

    def attribute(self, inputs, target=None, position: int = -1):
        """Direct logit attribution of `target` (a token id or one token's text; default: the top prediction) at
        `position`: embedding, heads, MLPs and chosen experts, with the final norm's scale frozen at that position.
        See workbench/analysis/attribution.py."""
        from workbench.analysis.attribution import attribute
        from workbench.views.attribution import attribution_figure

        return attribute(self, inputs, target, position, figure=attribution_figure)

    def steer_feature(self, sae, feature: int, amount: float):
        """`with s.steer_feature(sae, feature, amount):` adds amount * sae.W_dec[feature] to the residual stream the
        SAE reads (the output of decoder layer sae.layer). See workbench/analysis/sae.py."""
        from workbench.analysis.sae import steer_feature

        return steer_feature(self, sae, feature, amount)

    def __repr__(self) -> str:
        return f"Session({self.report.model!r}, preset={self.report.preset!r}, adapter={self.adapter.family!r})"

    def _repr_html_(self) -> str:
        return self.report._repr_html_()
