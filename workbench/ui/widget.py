"""A generation widget for Jupyter: prompt, sampling controls, live streaming by channel, token inspector.

    import workbench as wb
    s = wb.load(wb.default_model())
    w = wb.widget.widget(s)        # or s.widget(); keyword arguments set the controls' defaults
    w                              # display it; or drive it from Python:
    w.generate("Why is the sky blue?"); w.wait(); w.generation, w.final_text
    w.stop(); w.clear(); w.inspector.select_token(3); w.close()
    w.interventions.add("ablate experts", 3, "7, 12")   # the collapsible interventions panel, from Python

Interventions (workbench/interventions.py) set in the panel apply to each generation: the rows that are on
are parsed and validated when Generate is pressed (a bad row shows its error, and nothing runs), entered
just before the run starts and exited by the streaming thread once it has ended (finished, stopped or
failed), so the model is unchanged between generations. They are recorded with the generation, and the
token inspector's trace re-enters them, so it shows the experts the model really used.

Streaming runs in a background thread that reads the session's GenerationRun and updates the widget's
traitlets, at most every `flush_interval` seconds (so a long answer does not flood the page). harmony
models (gpt-oss) get the analysis channel in a collapsible, dimmed pane above the final answer; the
conversation is kept as chat messages (earlier answers go back with their analysis as `thinking`).
Errors (context too long, bad sampling values, a run already going) show in the widget's red error area.

Only standard ipywidgets 8 and plotly: no CDN, no custom JavaScript. JupyterLab ≥ 4 and Notebook 7 render
it as is. On Google Colab, enable third-party widgets once per notebook first:

    from google.colab import output
    output.enable_custom_widget_manager()
"""
from __future__ import annotations

import contextlib
import html
import threading
import time

import ipywidgets as widgets
import traitlets

from workbench.chat import harmony as chat_format
from workbench.errors import BusyError, SamplingError
from workbench.ui.closing import close_tree
from workbench.ui.interventions_panel import InterventionInspector, InterventionsPanel

DEFAULTS = dict(prompt="", system="", developer="", reasoning_effort="medium", temperature=1.0, top_p=1.0,
                max_new_tokens=512, seed=None)
_BUSY = "A generation is already running: press Stop, or wait for it to finish."


def widget(session, **defaults) -> "GenerationWidget":
    """A GenerationWidget on `session`. Keywords set the controls' starting values: prompt, system,
    developer, reasoning_effort, temperature, top_p, max_new_tokens, seed (None = random)."""
    return GenerationWidget(session, **defaults)


class GenerationWidget(widgets.VBox):
    running = traitlets.Bool(False)       # a generation is streaming
    error = traitlets.Unicode("")         # what the red error area shows ("" = hidden)
    status = traitlets.Unicode("")        # tokens, tokens/s, finish reason, seed
    final_text = traitlets.Unicode("")    # the final channel of the current turn, as streamed so far
    analysis_text = traitlets.Unicode("")  # every other channel (analysis, commentary)
    token_count = traitlets.Int(0)

    flush_interval = 0.08  # seconds between widget updates while streaming
    # class-level defaults, so close() (also called from __del__) works on a half-built widget
    _run = None
    _thread: threading.Thread | None = None
    _closed = False
    inspector = None

    def __init__(self, session, **defaults):
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown widget option(s) {sorted(unknown)}; choose from {sorted(DEFAULTS)}")
        o = {**DEFAULTS, **defaults}
        self.session = session
        self.harmony = session.harmony
        self.history: list[dict] = []      # the conversation so far, as chat messages
        self.generation = None             # the last finished Generation
        self.generation_interventions: list[tuple[str, dict]] = []  # what was active for it: (name, spec)

        full = widgets.Layout(width="100%")
        self.prompt = widgets.Textarea(value=o["prompt"], placeholder="Ask something…", rows=3, layout=full)
        self.system = widgets.Textarea(value=o["system"] or "", rows=2, layout=full, placeholder=(
            "model identity (harmony system message)" if self.harmony else "system prompt"))
        self.developer = widgets.Textarea(value=o["developer"] or "", rows=2, layout=full,
                                          placeholder="developer instructions")
        instructions = [widgets.Label("system"), self.system]
        if self.harmony:  # plain models merge developer into the system message: one box is enough
            instructions += [widgets.Label("developer"), self.developer]
        self.instructions = widgets.Accordion([widgets.VBox(instructions)], titles=("instructions",),
                                              selected_index=None)
        self.reasoning = widgets.Dropdown(options=chat_format.REASONING_EFFORTS, value=o["reasoning_effort"],
                                          description="reasoning", disabled=not self.harmony,
                                          layout=widgets.Layout(width="200px",
                                                                display="" if self.harmony else "none"))
        self.temperature = widgets.FloatSlider(value=o["temperature"], min=0.0, max=2.0, step=0.05,
                                               description="temperature", readout_format=".2f",
                                               style={"description_width": "initial"})
        self.top_p = widgets.FloatSlider(value=o["top_p"], min=0.01, max=1.0, step=0.01, description="top-p")
        # IntText, not BoundedIntText: out-of-range values reach the session and its message explains them
        self.max_new_tokens = widgets.IntText(value=o["max_new_tokens"], description="max tokens",
                                              layout=widgets.Layout(width="200px"))
        self.seed = widgets.Text(value="" if o["seed"] is None else str(o["seed"]), placeholder="random",
                                 description="seed", layout=widgets.Layout(width="200px"))
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = widgets.Button(description="Clear", icon="trash")
        self.generate_button.on_click(lambda _: self.generate())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())

        self.error_area = widgets.HTML(layout=widgets.Layout(display="none"))
        self.status_label = widgets.HTML()
        self.history_view = widgets.HTML()
        self.analysis_pane = widgets.HTML()
        self.analysis = widgets.Accordion([self.analysis_pane], titles=("analysis (reasoning)",), selected_index=0,
                                          layout=widgets.Layout(display="none"))
        self.final_pane = widgets.HTML()
        self.interventions = InterventionsPanel(session)
        self.inspector = InterventionInspector(session)
        self.inspector.add_class("wb-inspector")
        for w, name in ((self.final_pane, "wb-final"), (self.analysis_pane, "wb-analysis"),
                        (self.error_area, "wb-error"), (self.status_label, "wb-status"),
                        (self.generate_button, "wb-generate"), (self.stop_button, "wb-stop"),
                        (self.prompt, "wb-prompt")):
            w.add_class(name)  # stable hooks for the browser test and for users' CSS

        controls = widgets.HBox([self.reasoning, self.max_new_tokens, self.seed],
                                layout=widgets.Layout(flex_flow="row wrap"))
        sliders = widgets.HBox([self.temperature, self.top_p], layout=widgets.Layout(flex_flow="row wrap"))
        buttons = widgets.HBox([self.generate_button, self.stop_button, self.clear_button, self.status_label])
        super().__init__([self.history_view, self.prompt, self.instructions, controls, sliders, self.interventions,
                          buttons,
                          self.error_area, self.analysis, self.final_pane, self.inspector])
        self.add_class("wb-widget")

    # ---- what the user does ------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None) -> bool:
        """Start generating from the prompt box (or `prompt`). Returns False, with the reason in the error
        area, when it cannot start: a run going on, an empty prompt, or a bad setting."""
        if prompt is not None:
            self.prompt.value = prompt
        if self._closed:
            raise RuntimeError("this widget was closed: make a new one with widget(session)")
        if self.running:
            self.error = _BUSY
            return False
        text = self.prompt.value
        if not text.strip():
            self.error = "Type a prompt first."
            return False
        messages = self.history + [{"role": "user", "content": text}]
        stack = contextlib.ExitStack()  # the interventions, left by the streaming thread once the run ends
        try:
            interventions = self.interventions.build()  # parsed and checked before anything changes
            for intervention in interventions:
                stack.enter_context(intervention)
            run = self.session.stream(messages, **self.options())
        except BusyError:
            stack.close()
            self.error = _BUSY + " (another generation on this session)"
            return False
        except Exception as e:  # bad intervention, context length, sampling values, chat template: shown
            stack.close()
            self.error = f"{type(e).__name__}: {e}"
            return False
        self.error = ""
        self._run = run
        self._begin_turn(text)
        self.running = True
        records = [("steer", dict(vector=i.vector, layer=i.layer, scale=i.scale, channels=i.channels))
                   if i.name == "steer" else (i.name, i.spec) for i in interventions]
        self._thread = threading.Thread(target=self._consume, args=(run, text, stack, records),
                                        name="workbench-widget", daemon=True)
        self._thread.start()
        return True

    def options(self) -> dict:
        """The controls as keyword arguments for Session.stream."""
        seed = self.seed.value.strip()
        if seed and not seed.isdigit():
            raise SamplingError(f"seed must be a whole number >= 0 or empty (random), got {seed!r}")
        o = dict(temperature=self.temperature.value, top_p=self.top_p.value,
                 max_new_tokens=self.max_new_tokens.value, seed=int(seed) if seed else None,
                 system=self.system.value.strip() or None)
        if self.harmony:
            o.update(reasoning_effort=self.reasoning.value, developer=self.developer.value.strip() or None)
        return o

    def stop(self) -> None:
        """Ask the running generation to end (after the token being computed)."""
        if self._run is not None:
            self._run.stop()

    def wait(self, timeout: float | None = None):
        """Block until the current generation and its widget updates are done; returns the Generation.
        Ctrl-C (a kernel interrupt) while waiting stops the generation."""
        thread = self._thread
        if thread is not None:
            try:
                thread.join(timeout)
            except KeyboardInterrupt:
                self.stop()
                raise
            if thread.is_alive():
                raise TimeoutError(f"the generation is still running after {timeout}s (call .stop() to end it)")
        return self.generation

    def clear(self) -> bool:
        """Forget the conversation and empty the panes. Refused (visibly) while a generation runs."""
        if self.running:
            self.error = "Stop the generation before clearing the conversation."
            return False
        self.history, self.generation, self.generation_interventions = [], None, []
        self.error = self.status = self.final_text = self.analysis_text = ""
        self.token_count = 0
        self.history_view.value = ""
        self.inspector.reset()
        return True

    def close(self) -> None:
        """Stop any run, wait for its thread to end, and close every widget this one made (children, their
        layouts and styles, the inspector's figures), so none stays in the kernel once closed."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self.inspector is not None:
            self.inspector.close()  # also lets go of its trace (possibly large), even if `w` is kept
        close_tree(self)

    # ---- streaming (background thread) -------------------------------------------------------------------
    def _begin_turn(self, text: str) -> None:
        self.final_text = self.analysis_text = ""
        self.token_count = 0
        self.status = "starting…"
        self._render_history(pending=text)
        self.inspector.reset("(generating…)")
        self.prompt.value = ""

    def _consume(self, run, user_text: str, stack: contextlib.ExitStack, records: list) -> None:
        channels: dict[str, str] = {}
        start, last_flush, n = time.perf_counter(), 0.0, 0
        try:
            for delta in run:
                channels[delta.channel] = channels.get(delta.channel, "") + delta.text
                n = delta.index + len(delta.token_ids)  # index counts header tokens too
                now = time.perf_counter()
                if now - last_flush >= self.flush_interval:  # batch: at most one update per interval
                    last_flush = now
                    self._show(channels, n, f"generating… {n} tokens · {n / (now - start):.1f} tok/s")
        except Exception:
            pass  # the run keeps the exception; result(raise_errors=False) reports it below
        finally:
            self._finish(run, user_text, stack, records)

    def _finish(self, run, user_text: str, stack: contextlib.ExitStack, records: list) -> None:
        try:
            g = run.result(raise_errors=False)
            stack.close()  # the run has ended: undo the interventions (waits until the session is idle)
            if g is None:  # the run could not even build a Generation
                raise RuntimeError(run.error or "the generation ended without a result")
            self.generation, self.generation_interventions = g, records
            self._show(g.channels, len(g.token_ids),
                       f"{len(g.token_ids)} tokens · {g.tokens_per_second:.1f} tok/s · {g.finish_reason} · "
                       f"seed {g.params.seed}")
            if g.error:
                self.error = f"Generation failed: {g.error}"
                self.prompt.value = self.prompt.value or user_text  # give the prompt back to retry
            else:
                if self.error == _BUSY:
                    self.error = ""  # the refusal no longer applies
                self.history += [{"role": "user", "content": user_text}, self._assistant_message(g)]
            if not self._closed:
                self.inspector.show(g, records)
            # the panes hold this turn's answer; the history above them shows what came before it
            self._render_history(pending=None if g.error else user_text)
        except Exception as e:  # a widget that says why beats a widget stuck in "running"
            self.error = f"{type(e).__name__}: {e}"
        finally:
            try:
                stack.close()  # no-op unless something above failed first
            except Exception as e:
                self.error = f"undoing the interventions failed: {type(e).__name__}: {e}"
            self._run = None
            self.running = False

    def _assistant_message(self, g) -> dict:
        """The answer as it goes back to the model next turn: final text, the analysis as `thinking`."""
        message = {"role": "assistant", "content": g.channels.get("final", "") if self.harmony else g.text}
        if self.harmony and g.channels.get("analysis"):
            message["thinking"] = g.channels["analysis"]
        return message

    def _show(self, channels: dict, n: int, status: str) -> None:
        self.final_text = channels.get("final", "")
        others = {k: v for k, v in channels.items() if k != "final"}
        self.analysis_text = others.get("analysis", "") if list(others) in ([], ["analysis"]) else \
            "\n\n".join(f"[{k}]\n{v}" for k, v in others.items())
        self.token_count = n
        self.status = status

    # ---- rendering (traitlet observers) -----------------------------------------------------------------
    @traitlets.observe("running")
    def _on_running(self, change):
        self.generate_button.disabled = change["new"]
        self.stop_button.disabled = not change["new"]

    @traitlets.observe("error")
    def _on_error(self, change):
        self.error_area.value = (f"<div style='color:#b00;background:#fee;border:1px solid #d99;padding:4px 8px;"
                                 f"white-space:pre-wrap'>{html.escape(change['new'])}</div>")
        self.error_area.layout.display = "" if change["new"] else "none"

    @traitlets.observe("status")
    def _on_status(self, change):
        self.status_label.value = f"<span style='color:#666'>{html.escape(change['new'])}</span>"

    @traitlets.observe("final_text")
    def _on_final(self, change):
        self.final_pane.value = (f"<div style='white-space:pre-wrap;font-size:1.1em;border-left:3px solid #4a8;"
                                 f"padding:4px 8px'>{html.escape(change['new'])}</div>") if change["new"] else ""

    @traitlets.observe("analysis_text")
    def _on_analysis(self, change):
        self.analysis_pane.value = (f"<div style='white-space:pre-wrap;color:#777;font-size:0.9em'>"
                                    f"{html.escape(change['new'])}</div>")
        self.analysis.layout.display = "" if change["new"] else "none"

    def _render_history(self, pending: str | None = None) -> None:
        """Earlier turns, then `pending` (the prompt whose answer the panes show)."""
        earlier = self.history
        if pending is not None and earlier[-2:-1] == [{"role": "user", "content": pending}]:
            earlier = earlier[:-2]  # that turn is finished and in history already: show it once
        turns = [(m["role"], m["content"]) for m in earlier]
        if pending is not None:
            turns.append(("user", pending))
        self.history_view.value = "".join(
            f"<div style='margin:2px 0;padding:2px 8px;{'background:#f3f6fb' if role == 'user' else ''}'>"
            f"<b>{'you' if role == 'user' else 'model'}:</b> <span style='white-space:pre-wrap'>"
            f"{html.escape(content)}</span></div>" for role, content in turns)
