"""Small forward-hook helpers: read a module's input or output, stop a forward early."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed activations are read."""


def first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def capture(module: torch.nn.Module, what: str = "input", stop: bool = False):
    """Yield a dict whose "value" is `module`'s first input or output tensor after a forward.

    With `stop=True` the forward ends right after `module` (wrap the call in `run_until`).
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        store["value"] = first_tensor(inputs if what == "input" else output)
        if stop:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_until(fn, *args, **kwargs):
    """Call `fn`, treating a `StopForward` from a hook as a normal end."""
    try:
        return fn(*args, **kwargs)
    except StopForward:
        return None
