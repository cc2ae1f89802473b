"""gpt-oss workbench: load, chat, trace and look inside gpt-oss and other Hugging Face causal LMs.

    import workbench as wb
    wb.plan("openai/gpt-oss-20b", preset="mxfp4")   # memory before any download
    s = wb.load("openai/gpt-oss-20b", preset="auto")
    g = s.chat("Why is the sky blue?", reasoning_effort="low")
    t = s.trace(g)                                   # routing + attention (with sinks) of that conversation
"""
from workbench import errors
from workbench.model.adapters import ADAPTERS, Adapter, adapter_for
from workbench.intervene.compare import Comparison
from workbench.errors import (BusyError, CaptureBudgetError, CaptureError, ChatError, ContextLengthError, DoesNotFitError,
                     InterventionError, ModelNotFoundError, NotACausalLMError, PresetError, SamplingError,
                     TraceFileError, TraceModelMismatchError, WorkbenchError)
from workbench.intervene.interventions import ablate_experts, ablate_heads, force_experts, scale_sinks, steer_experts
from workbench.model.loading import default_model, load
from workbench.model.planning import plan, plan_all
from workbench.model.presets import PRESET_NAMES, PRESETS
from workbench.analysis.presets_compare import PresetComparison, compare_presets
from workbench.analysis.routing_stats import RoutingStats, merge_routing_stats
from workbench.session import Session
from workbench.inspect.trace import Trace, trace

__version__ = "0.1.0"
