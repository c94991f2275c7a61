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


@contextmanager
def record_instead(modules: list[torch.nn.Module]):
    """Inside the block, `modules` do not compute: each passes its first input on unchanged
    and records the keyword arguments it was called with (the yielded list, in call order);
    the forward ends with `StopForward` once the last of them has been called. Hooks on the
    modules still run."""
    calls: list[dict] = []
    own = [module.__dict__.get("forward") for module in modules]   # e.g. accelerate's wrapper

    def recorder(last: bool):
        def forward(hidden, *args, **kwargs):
            assert not args, "decoder blocks are expected to take hidden states first"
            calls.append(dict(kwargs))
            if last:
                raise StopForward
            return hidden
        return forward

    for i, module in enumerate(modules):
        module.forward = recorder(i == len(modules) - 1)
    try:
        yield calls
    finally:
        for module, forward in zip(modules, own):
            del module.forward
            if forward is not None:
                module.forward = forward


def run_until(fn, *args, **kwargs):
    """Call `fn`, treating a `StopForward` from a hook as a normal end."""
    try:
        return fn(*args, **kwargs)
    except StopForward:
        return None


@contextmanager
def replace_linear_weights(linears: dict[int, torch.nn.Linear], weights: dict[int, torch.Tensor]):
    """Inside the block, `linears[l]` computes x @ weights[l] (+ bias) instead of its own
    weight, W [d_in, d_out] in the K W ≈ V convention: gradients reach `weights`."""

    def make_hook(linear, W):
        def hook(_module, inputs, _output):
            out = inputs[0] @ W.to(inputs[0].dtype)
            return out + linear.bias if linear.bias is not None else out
        return hook

    handles = [linears[l].register_forward_hook(make_hook(linears[l], W))
               for l, W in weights.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
