"""Closing a tree of ipywidgets completely.

`Widget.close()` closes only that one widget: its children, and the Layout and Style widgets every widget
owns (a Button is 3 widget objects), stay in ipywidgets' registry of live widgets, and so does everything
they reference (callbacks, figures, traces), for the life of the kernel. `close_tree` closes them all.
"""
from __future__ import annotations

import ipywidgets as widgets
from ipywidgets.widgets.widget import _instances


def live_widgets() -> int:
    """How many widget objects ipywidgets keeps alive (its registry; 8.x names it `_instances`)."""
    return len(_instances)


def _held(w: widgets.Widget):
    """The widgets `w` refers to through its synced traits: children, layout, style, an Accordion's pages."""
    for name in w.keys:
        value = getattr(w, name, None)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, widgets.Widget):
                yield item


def close_tree(root: widgets.Widget) -> None:
    """Close `root` and every widget reachable from it, and drop their observers and click handlers,
    so nothing of the tree stays alive through the registry or through callbacks that refer back to it."""
    seen, stack = set(), [root]
    while stack:
        w = stack.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        stack.extend(_held(w))
        if isinstance(w, widgets.Output):
            w.outputs = ()  # figure bundles can be large
        widgets.Widget.close(w)  # the base close: subclasses' own close() may call close_tree on themselves
        w.unobserve_all()  # observers are closures over the widgets: break the cycles at once
        if isinstance(w, widgets.Button):
            w._click_handlers.callbacks.clear()
