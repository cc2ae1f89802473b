"""Every private part of transformers/accelerate/torch the workbench touches still exists in the installed versions.

workbench/model/compat.py is the only module that touches them; a release that moves one fails here, by name."""
from __future__ import annotations

import importlib

import pytest
import torch
from transformers import GptOssConfig

from workbench.model import compat


@pytest.mark.parametrize("module, path", compat.TOUCHPOINTS)
def test_touchpoint_exists(module, path):
    obj = importlib.import_module(module)
    parts = path.split(".")
    if parts[-1].endswith("_internal"):  # an instance attribute of configs: check on a real one
        assert hasattr(GptOssConfig(), parts[-1]), f"{module}.{path} moved: update workbench/model/compat.py"
        return
    for part in parts:
        assert hasattr(obj, part), f"{module}.{path} moved: update workbench/model/compat.py"
        obj = getattr(obj, part)


def test_swaps_undo_exactly():
    config = GptOssConfig()
    before = config._attn_implementation_internal, config._experts_implementation_internal
    undo_a = compat.set_attention_implementation(config, "eager")
    undo_e = compat.set_experts_implementation(config, "batched_mm")
    assert config._experts_implementation == "batched_mm"
    undo_e(), undo_a()
    assert (config._attn_implementation_internal, config._experts_implementation_internal) == before
    module = torch.nn.Linear(2, 2)
    original = module.weight
    undo = compat.swap_parameter(module, "weight", torch.nn.Parameter(torch.zeros(2, 2)))
    assert (module.weight == 0).all()
    undo()
    assert module.weight is original
    undo = compat.register_attention_function("workbench_test_fn", lambda *a, **k: None, mask_like="sdpa")
    from transformers.modeling_utils import AttentionInterface

    assert "workbench_test_fn" in AttentionInterface._global_mapping
    undo()
    assert "workbench_test_fn" not in AttentionInterface._global_mapping
    assert compat.offload_hook(module) is None
    assert callable(compat.grouped_linear()) and callable(compat.batched_linear())


def test_every_error_class_is_exported():
    import workbench as wb
    from workbench import errors

    classes = [n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, Exception)
               and c.__module__ == "workbench.errors"]
    assert all(getattr(wb, n, None) is getattr(errors, n) and n in wb.__all__ for n in classes)
