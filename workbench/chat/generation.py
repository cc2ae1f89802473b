"""Streaming generation in a background thread: stop, per-token logprobs and top-k alternatives.

`start(...)` returns a `GenerationRun` at once; iterate it for `Delta`s (text + channel) while the model
writes, `.stop()` it, or `.result()` for the finished `Generation`. Decoding is transformers'
`model.generate` (KV cache, full speed) with two small plug-ins:

- `_Recorder` (a LogitsProcessor) sees each step's logits row and keeps log_softmax top-k. transformers
  runs user processors *before* its temperature/top-k/top-p warpers, so these are the model's raw
  log-probabilities, not the sampling distribution. The few built-in processors that run earlier
  (repetition penalty, n-gram blocking, min length) are switched off: `SamplingParams` alone decides.
  Token bans a model's generation_config may carry (bad_words_ids, suppress_tokens; rare outside
  speech models) cannot be switched off this way and would still apply before the recorder.
- `_OnToken` (a StoppingCriteria) runs after each chosen token: records its logprob, feeds the chat parser,
  queues the deltas and ends generation when `.stop()` was called.

Sampling uses transformers' warpers and our own draw from a private `torch.Generator`, so a seed gives the
same tokens every time without touching (or locking) torch's global RNG.
"""
from __future__ import annotations

import dataclasses
import html
import logging
import math
import queue
import secrets
import threading
import time
import weakref

import torch
from transformers import (
    LogitsProcessor,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from workbench.errors import ContextLengthError, SamplingError
from workbench.model.adapters import input_device, text_config


@dataclasses.dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0 = off; seed None = a fresh random seed."""
    temperature: float = 1.0     # gpt-oss's recommended defaults: temperature 1.0, top_p 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int | None = None
    top_alternatives: int = 5    # how many raw top-k alternatives to record per step

    def validate(self) -> SamplingParams:
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)
        t, p = self.temperature, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise SamplingError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**63):
            raise SamplingError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if not is_int(self.top_alternatives) or self.top_alternatives < 0:
            raise SamplingError(f"top_alternatives must be an int >= 0, got {self.top_alternatives!r}")
        return self


@dataclasses.dataclass
class Generation:
    """A finished (or stopped) completion. logprobs/alternatives are under the model's raw distribution
    (log_softmax of the logits, before temperature/top-k/top-p), so they do not depend on sampling."""
    prompt_ids: list[int]
    token_ids: list[int]
    tokens: list[str]                 # each completion token decoded on its own, readable
    text: str                         # the "final" channel if there is one, else all text
    channels: dict[str, str]
    token_channels: list[str]
    messages: list[dict]
    logprobs: list[float]             # log p(chosen token) per step
    alternatives: list[list[tuple[int, str, float]]]  # per step: (token_id, text, logprob), best first
    finish_reason: str                # "stop" | "length" | "stopped" | "error"
    tokens_per_second: float          # decode speed, first token (prefill) excluded
    prefill_seconds: float            # start to first token
    total_seconds: float
    params: SamplingParams            # with the seed actually used
    error: str | None = None

    def __repr__(self) -> str:
        return (f"Generation({len(self.token_ids)} tokens, finish_reason={self.finish_reason!r}, "
                f"{self.tokens_per_second:.1f} tok/s, text={self.text[:60]!r})")

    def _repr_html_(self) -> str:
        head = (f"<div style='color:#666;font-size:90%'>{len(self.token_ids)} tokens · {self.finish_reason} · "
                f"{self.tokens_per_second:.1f} tok/s · prefill {self.prefill_seconds:.2f}s</div>")
        blocks = "".join(
            f"<div style='margin:4px 0;padding:4px 8px;border-left:3px solid "
            f"{'#4a8' if name == 'final' else '#aaa'}'><b>{html.escape(name)}</b>"
            f"<div style='white-space:pre-wrap'>{html.escape(text)}</div></div>"
            for name, text in self.channels.items())
        error = f"<div style='color:#b00'>{html.escape(self.error)}</div>" if self.error else ""
        return f"<div>{head}{blocks}{error}</div>"


class _State:
    """What the generation thread shares with the two generate() plug-ins."""

    def __init__(self, parser, out: queue.Queue, stop: threading.Event, k: int, stop_ids, max_new_tokens: int):
        self.parser, self.out, self.stop, self.k = parser, out, stop, k
        self.stop_ids, self.max_new_tokens = set(stop_ids), max_new_tokens
        self.logp = None                       # log_softmax of the current step's raw logits
        self.token_ids: list[int] = []
        self.chosen: list[torch.Tensor] = []   # 0-d tensors; turned into floats once, at the end
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.first_time = self.last_time = None
        self.finished = False                  # ignore any step generate() runs after we said stop


class _Recorder(LogitsProcessor):
    def __init__(self, state: _State):
        self.s = state

    def __call__(self, input_ids, scores):
        if not self.s.finished:
            self.s.logp = scores[0].log_softmax(-1)  # one row; the top-k keeps only k values
            if self.s.k:
                self.s.top.append(self.s.logp.topk(min(self.s.k, self.s.logp.shape[-1])))
        return scores


class _Sampler(LogitsProcessor):
    """Draw a token from the warped distribution with a private generator; leave only it possible."""

    def __init__(self, seed: int):
        self.seed, self.generator = seed, None

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        choice = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)
        return torch.full_like(scores, -math.inf).scatter_(-1, choice, 0.0)


class _OnToken(StoppingCriteria):
    def __init__(self, state: _State):
        self.s = state

    def __call__(self, input_ids, scores, **kwargs):
        s = self.s
        if not s.finished:
            token = int(input_ids[0, -1])  # the one host sync per step (streaming needs the id anyway)
            s.last_time = time.perf_counter()
            s.first_time = s.first_time or s.last_time
            s.token_ids.append(token)
            s.chosen.append(s.logp[token])
            for delta in s.parser.feed(token):
                s.out.put(delta)
            # also mark our own end, in case generate() runs a step past it (deferred stop checks on mps)
            s.finished = s.stop.is_set() or token in s.stop_ids or len(s.token_ids) >= s.max_new_tokens
        return torch.full((input_ids.shape[0],), s.finished, dtype=torch.bool, device=input_ids.device)


def context_limit(model, tokenizer) -> int | None:
    """The model's context in tokens: config.max_position_embeddings, else a sane tokenizer.model_max_length."""
    config = text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        limit = getattr(tokenizer, "model_max_length", None)
        limit = limit if limit and limit < 10**8 else None  # "1e30" means unknown
    return limit


def check_context(n_prompt: int, max_new_tokens: int, limit: int | None) -> None:
    if n_prompt == 0:
        raise ContextLengthError("the prompt is empty: give at least one token (a rendered chat always has some)")
    if limit is None:
        return
    if n_prompt >= limit:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens but the model's context is {limit} tokens, so nothing can be "
            f"generated: shorten the prompt (fewer or shorter messages) to well under {limit} tokens")
    if n_prompt + max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens and max_new_tokens={max_new_tokens} would reach "
            f"{n_prompt + max_new_tokens}, past the model's context of {limit} tokens: use "
            f"max_new_tokens={limit - n_prompt} or less, or shorten the prompt")


class _Job:
    """Everything the thread needs. The thread holds this, not the GenerationRun, so a dropped run can be
    garbage-collected and its finalizer can stop the thread."""

    def __init__(self):
        self.out: queue.Queue = queue.Queue()
        self.stop, self.done = threading.Event(), threading.Event()
        self.generation: Generation | None = None
        self.error: BaseException | None = None
        self.callbacks: list = []
        self.lock = threading.Lock()


_END = object()


class GenerationRun:
    """A generation running in a background thread. Iterate for `Delta`s; `.stop()`; `.result()`."""

    def __init__(self, job: _Job, thread: threading.Thread):
        self._job, self._thread = job, thread
        weakref.finalize(self, job.stop.set)  # dropped without waiting: stop decoding

    @property
    def running(self) -> bool:
        return not self._job.done.is_set()

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the run, if one did (iteration and result() raise it too)."""
        return self._job.error

    def stop(self) -> None:
        """Ask the generation to end; it does after the token being computed now."""
        self._job.stop.set()

    def on_finish(self, callback) -> None:
        """Call `callback()` once the thread has finished (at once if it already has)."""
        with self._job.lock:
            if not self._job.done.is_set():
                self._job.callbacks.append(callback)
                return
        callback()

    def __iter__(self):
        job = self._job
        try:
            while True:
                try:
                    item = job.out.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive everywhere
                except queue.Empty:
                    continue
                if item is _END:
                    job.out.put(_END)  # so a second iteration also ends
                    self._thread.join()
                    break
                yield item
        finally:
            if not job.done.is_set():  # the consumer left early (break, Ctrl-C, generator closed)
                self.stop()
        if job.error is not None:
            raise job.error

    def result(self, timeout: float | None = None, *, raise_errors: bool = True) -> Generation:
        """Wait for the end. Re-raises an exception from the thread unless raise_errors=False, which returns
        the partial Generation with finish_reason "error". Ctrl-C while waiting stops the generation."""
        try:
            if not self._job.done.wait(timeout):
                raise TimeoutError(f"the generation is still running after {timeout}s (call .stop() to end it)")
        except KeyboardInterrupt:
            self.stop()
            raise
        self._thread.join()  # done is set just before the thread exits
        if self._job.error is not None and raise_errors:
            raise self._job.error
        return self._job.generation

    def __repr__(self) -> str:
        return f"GenerationRun(running={self.running})"


def start(model, tokenizer, prompt_ids, params: SamplingParams | None = None, parser=None, *,
          stop_token_ids: list[int] | None = None) -> GenerationRun:
    """Start generating after `prompt_ids` in a background thread. `parser` defaults to chat.make_parser,
    `stop_token_ids` to chat.stop_token_ids (pass [] to run to max_new_tokens)."""
    params = dataclasses.replace(params or SamplingParams()).validate()
    prompt_ids = [int(t) for t in prompt_ids]
    check_context(len(prompt_ids), params.max_new_tokens, context_limit(model, tokenizer))
    if parser is None or stop_token_ids is None:
        from workbench.chat import harmony as chat
        parser = parser if parser is not None else chat.make_parser(tokenizer)
        stop_token_ids = stop_token_ids if stop_token_ids is not None else chat.stop_token_ids(tokenizer)
    if params.seed is None:
        params.seed = secrets.randbits(63)  # recorded in the Generation, so any run can be replayed
    job = _Job()
    thread = threading.Thread(target=_run, args=(job, model, tokenizer, prompt_ids, params, parser,
                                                 list(stop_token_ids)), name="workbench-generate", daemon=True)
    run = GenerationRun(job, thread)
    thread.start()
    return run


def generate(model, tokenizer, prompt_ids, params: SamplingParams | None = None, parser=None, **kw) -> Generation:
    """Generate a whole completion (blocking). Same arguments as `start`."""
    return start(model, tokenizer, prompt_ids, params, parser, **kw).result()


def _run(job: _Job, model, tokenizer, prompt_ids, params, parser, stop_ids) -> None:
    state = _State(parser, job.out, job.stop, params.top_alternatives, stop_ids, params.max_new_tokens)
    processors = [_Recorder(state)]
    if params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        processors.append(_Sampler(params.seed))
    device = input_device(model)
    input_ids = torch.tensor([prompt_ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    t0 = time.perf_counter()
    try:
        model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=params.max_new_tokens,
            do_sample=False,  # our _Sampler draws; generate's argmax then picks the one token left
            eos_token_id=stop_ids, pad_token_id=pad, logits_processor=processors, stopping_criteria=[_OnToken(state)],
            # neutral values, so nothing from model.generation_config runs before _Recorder or changes sampling
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, renormalize_logits=False)
        for delta in parser.finish():
            job.out.put(delta)
    except BaseException as e:  # surfaced to the caller by iteration / result()
        job.error = e
    finally:
        try:
            job.generation = _build(state, tokenizer, prompt_ids, params, stop_ids, t0, job.error)
        except Exception as e:  # never leave the caller waiting on a run that cannot report
            job.error = job.error or e
        with job.lock:
            callbacks, job.callbacks = job.callbacks, []
            job.done.set()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a failing callback must not hide the generation's outcome
                logging.getLogger(__name__).exception("on_finish callback failed")
        job.out.put(_END)


def _build(s: _State, tokenizer, prompt_ids, params, stop_ids, t0, error) -> Generation:
    end = time.perf_counter()
    ids = s.token_ids
    if error is not None:
        reason = "error"
    elif ids and ids[-1] in stop_ids:
        reason = "stop"
    elif len(ids) < params.max_new_tokens and s.stop.is_set():
        reason = "stopped"
    else:
        reason = "length"
    cache: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i], skip_special_tokens=False)
        return cache[i]

    logprobs = torch.stack(s.chosen).tolist() if s.chosen else []
    alternatives = []
    if s.top:
        top = s.top[:len(ids)]
        values = torch.stack([v for v, _ in top]).tolist()
        indices = torch.stack([i for _, i in top]).tolist()
        alternatives = [[(i, text(i), v) for i, v in zip(ii, vv)] for ii, vv in zip(indices, values)]
    channels = dict(getattr(s.parser, "channels", {}))
    n = len(ids)
    decode_time = (s.last_time - s.first_time) if n > 1 else 0.0
    return Generation(
        prompt_ids=list(prompt_ids), token_ids=list(ids), tokens=[text(i) for i in ids],
        text=channels.get("final", "".join(channels.values())), channels=channels,
        token_channels=list(getattr(s.parser, "token_channels", [])),
        messages=list(getattr(s.parser, "messages", [])), logprobs=logprobs, alternatives=alternatives,
        finish_reason=reason, tokens_per_second=(n - 1) / decode_time if decode_time > 0 else 0.0,
        prefill_seconds=(s.first_time - t0) if s.first_time else end - t0, total_seconds=end - t0,
        params=params, error=None if error is None else f"{type(error).__name__}: {error}")
