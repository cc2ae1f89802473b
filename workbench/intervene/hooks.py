"""The escape hatch: read or replace any module's output inside a `with` block.

    with s.hook("model.layers.3.mlp", lambda module, args, output: output * 0):   # replace
        g = s.chat("...")
    seen = []
    with s.hook("model.layers.3.self_attn.o_proj", lambda m, a, out: seen.append(out.detach())):  # read
        s.trace("...")

`fn(module, args, output)` runs after the module's forward; what it returns (anything but None) becomes the
module's output. The hook is removed on exit, also through an exception, and it is listed in the
provenance of traces taken inside the block.
"""
from __future__ import annotations

import difflib

from workbench.errors import InterventionError
from workbench.intervene.interventions import Intervention


def module_names(model, contains: str | None = None) -> list[str]:
    """Addressable module names of `model` (the paths `hook` takes), optionally those containing `contains`."""
    names = [n for n, _ in model.named_modules() if n]
    return [n for n in names if contains is None or contains in n]


class hook(Intervention):
    """`with hook(s, "model.layers.3.mlp", fn):` fn(module, args, output) after that module's forward; a
    non-None return value replaces the output."""

    name = "hook"
    example = 'hook(s, "model.layers.3.mlp", fn)'

    def __init__(self, session, path: str, fn):
        self.path, self.fn = path, fn
        super().__init__(session, {"path": path})

    def _check(self, spec):
        path = spec["path"]
        if not isinstance(path, str):
            raise InterventionError(f"hook takes a module path such as 'model.layers.0.mlp', not {path!r}.")
        if not callable(self.fn):
            raise InterventionError(f"hook needs a function fn(module, args, output), not {self.fn!r}.")
        modules = dict(self.model.named_modules())
        if path not in modules or not path:
            near = difflib.get_close_matches(path, list(modules), n=5, cutoff=0.5)
            raise InterventionError(f"no module {path!r} in this model. Near matches: "
                                    f"{', '.join(near) if near else '(none)'}. s.modules() lists them all.")
        self.module = modules[path]
        return {"path": path}

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "fn": getattr(self.fn, "__qualname__", repr(self.fn))}

    def __repr__(self) -> str:
        return f"hook({self.path!r}, {getattr(self.fn, '__qualname__', self.fn)!r})"

    def _install(self) -> None:
        handle = self.module.register_forward_hook(lambda module, args, output: self.fn(module, args, output))
        self._undo.append(handle.remove)
