"""gpt-oss workbench: load, chat, trace and look inside gpt-oss and other Hugging Face causal LMs.

    import workbench as wb
    wb.plan("openai/gpt-oss-20b", preset="mxfp4")   # memory before any download
    s = wb.load("openai/gpt-oss-20b", preset="auto")
    g = s.chat("Why is the sky blue?", reasoning_effort="low")
    t = s.trace(g)                                   # routing + attention (with sinks) of that conversation

The layers, each a subpackage, data flowing one way: model → chat → inspect → intervene → analysis →
views → ui, with fixtures (offline models) beside them and `session` as the facade. See docs/architecture.md.
"""
from workbench import errors, fixtures
from workbench.analysis.presets_compare import PresetComparison, compare_presets
from workbench.analysis.routing_stats import RoutingStats, merge_routing_stats
from workbench.analysis.sae import SAE, load_sae
from workbench.chat.inputs import Conversation, conversation, user
from workbench.errors import (
    AdapterError,
    AttributionError,
    BusyError,
    CaptureBudgetError,
    CaptureError,
    ChatError,
    ContextLengthError,
    DoesNotFitError,
    HookPointError,
    InterventionError,
    ModelNotFoundError,
    NotACausalLMError,
    PatchingBudgetError,
    PatchingError,
    PresetComparisonError,
    PresetError,
    RoutingStatsError,
    SAEError,
    SamplingError,
    TraceFileError,
    TraceModelMismatchError,
    ViewError,
    WeightsFileError,
    WorkbenchError,
)
from workbench.inspect.capture import trace
from workbench.inspect.trace import BatchTrace, Trace
from workbench.intervene.compare import Comparison
from workbench.intervene.interventions import (
                              ablate_experts,
                              ablate_heads,
                              force_experts,
                              scale_sinks,
                              steer_experts,
)
from workbench.model.adapters import ADAPTERS, Adapter, adapter_for
from workbench.model.planning import plan, plan_all
from workbench.model.presets import PRESET_NAMES, PRESETS
from workbench.session import DEFAULT_KINDS, Session, default_model, load
from workbench.version import __version__

__all__ = [
    "ADAPTERS", "Adapter", "AdapterError", "BatchTrace", "BusyError", "CaptureBudgetError", "CaptureError", "ChatError",
    "Comparison", "ContextLengthError", "DEFAULT_KINDS", "DoesNotFitError", "InterventionError",
    "ModelNotFoundError", "NotACausalLMError", "PRESETS", "PRESET_NAMES", "PresetComparison",
    "PresetComparisonError", "PresetError", "RoutingStats", "RoutingStatsError", "SamplingError", "Session",
    "Trace", "TraceFileError", "TraceModelMismatchError", "ViewError", "WeightsFileError", "WorkbenchError",
    "ablate_experts", "ablate_heads", "adapter_for", "compare_presets", "default_model", "errors", "fixtures",
    "force_experts", "load", "merge_routing_stats", "plan", "plan_all", "scale_sinks", "steer_experts", "trace",
    "__version__",
]
__all__ += ["Conversation", "conversation", "user", "SAE", "load_sae", "SAEError", "PatchingError", "PatchingBudgetError", "HookPointError", "AttributionError"]
