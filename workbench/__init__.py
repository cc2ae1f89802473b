"""gpt-oss workbench: load, chat, trace and look inside gpt-oss and other Hugging Face causal LMs.

    import workbench as wb
    wb.plan("openai/gpt-oss-20b", preset="mxfp4")   # memory before any download
    s = wb.load("openai/gpt-oss-20b", preset="auto")
    g = s.chat("Why is the sky blue?", reasoning_effort="low")
"""
from . import errors
from .adapters import ADAPTERS, Adapter, adapter_for
from .errors import (BusyError, ChatError, ContextLengthError, DoesNotFitError, ModelNotFoundError, NotACausalLMError,
                     PresetError, SamplingError, WorkbenchError)
from .loading import default_model, load
from .planning import plan, plan_all
from .presets import PRESET_NAMES, PRESETS
from .session import Session

__version__ = "0.1.0"
