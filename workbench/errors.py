"""Errors a user can act on. Every message says what went wrong and what to do instead."""


class WorkbenchError(Exception):
    """Base class: catch this to handle any workbench error."""


class PresetError(WorkbenchError, ValueError):
    """An unknown preset, or one that cannot work for this model or on this machine."""


class ModelNotFoundError(WorkbenchError, FileNotFoundError):
    """The model is neither a local path nor in the Hugging Face cache, and the hub is unreachable."""


class NotACausalLMError(WorkbenchError, ValueError):
    """The model is not a causal (decoder-only) language model."""


class DoesNotFitError(WorkbenchError, MemoryError):
    """The memory plan says the model will not fit on the devices here."""


class ContextLengthError(WorkbenchError, ValueError):
    """The prompt (plus the tokens to generate) is longer than the model's context."""


class SamplingError(WorkbenchError, ValueError):
    """Invalid sampling parameters."""


class BusyError(WorkbenchError, RuntimeError):
    """A generation is already running on this session."""


class ChatError(WorkbenchError, ValueError):
    """Malformed chat messages, a bad reasoning effort, or a tokenizer without a chat template."""


class CaptureBudgetError(WorkbenchError, MemoryError):
    """A trace would need more memory than its budget; the message names cheaper requests."""


class TraceFileError(WorkbenchError, ValueError):
    """A .wbtrace file that cannot be read: not a trace, truncated, incomplete, damaged (a tensor that does not match
    its checksum), or from another version."""


class WeightsFileError(WorkbenchError, ValueError):
    """A damaged model weights file: truncated, a garbled header, unreadable, or holding NaN/inf values. The message
    names the file (and the tensors) and how to get a good copy."""


class TraceModelMismatchError(WorkbenchError, ValueError):
    """A trace used with a model other than the one it was recorded from."""


class CaptureError(WorkbenchError, ValueError):
    """A capture request that cannot work (unknown part, bad layer or head, batch larger than one)."""


class InterventionError(WorkbenchError, ValueError):
    """An intervention that cannot work: a layer, expert or head that does not exist, or a model without sinks."""


class AdapterError(WorkbenchError, ValueError):
    """A question the architecture cannot answer, e.g. routing of a dense model."""


class RoutingStatsError(WorkbenchError, ValueError):
    """Corpus routing statistics that cannot be computed, resumed or merged (mismatched model, bad file)."""


class PresetComparisonError(WorkbenchError, ValueError):
    """A comparison of presets that cannot be made: no preset loads, or the checkpoints are different models."""


class ViewError(CaptureError):
    """A view asked for something its trace does not hold (a layer not captured, a dense model's routing)."""


class PatchingError(WorkbenchError, ValueError):
    """An activation-patching request that cannot work: unknown site kind, prompts of different lengths, bad metric."""


class PatchingBudgetError(CaptureBudgetError):
    """Activation patching would cache more than its budget; the message names cheaper requests."""


class AttributionError(WorkbenchError, ValueError):
    """A logit attribution that cannot be made: a target that is not one token, a position out of range, or a
    model part attribution cannot reproduce (quantized weights, an unsupported norm or expert layout)."""


class SAEError(WorkbenchError, ValueError):
    """A sparse autoencoder that cannot be loaded or used: not an SAE folder, an unsupported architecture or hook
    point, or a d_in that does not match the model's residual stream."""


class HookPointError(WorkbenchError, ValueError):
    """A hook point that does not exist on this model (the message lists near matches), or one that cannot be
    changed the way it was asked (a read-only point, a path that cannot reach inside the experts)."""
