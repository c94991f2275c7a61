"""One step of an edit stream: keys and target values for a batch, the editor's update,
the new weights written into the model. Shared by every editor."""

from __future__ import annotations

import torch

from tasks.data import EditRequest
from tasks.extract.keys import block_outputs_at, compute_keys
from tasks.extract.prompts import kl_batch, prompt_batch, rewrite_batch
from tasks.extract.values import ValueArgs, compute_target_values


def layer_weight(lm, layer: int) -> torch.Tensor:
    """W = weight.T [d_k, d_v] of the edited projection of `layer` (a copy)."""
    return lm.mlp_out(layer).weight.detach().T.clone()


@torch.no_grad()
def write_weight(lm, layer: int, W: torch.Tensor) -> None:
    linear = lm.mlp_out(layer)
    linear.weight.copy_(W.T.to(dtype=linear.weight.dtype, device=linear.weight.device))


def apply_edit_batch(lm, editor, requests: list[EditRequest], templates: list[str],
                     layers: tuple[int, ...], value_args: ValueArgs) -> dict[str, float]:
    """Edit `requests` into `lm` in place through `editor`, spreading the residual over
    `layers` as MEMIT does (layer i of n takes 1/(n-i) of what is still missing)."""
    device = lm.model.device
    rewrite, groups = rewrite_batch(lm.tokenizer, requests, templates)
    rewrite, groups = rewrite.to(device), groups.to(device)
    kl = kl_batch(lm.tokenizer, requests).to(device)
    z, z_now = compute_target_values(lm, layers[-1], rewrite, groups, kl, value_args)
    bare = prompt_batch(lm.tokenizer, requests).to(device) if len(layers) > 1 else None
    stats = {"delta_norm": float((z - z_now).norm(dim=1).mean())}
    for i, layer in enumerate(layers):
        if i > 0:
            z_now = block_outputs_at(lm, layers[-1], bare)
        keys = compute_keys(lm, layer, rewrite, groups, len(requests))     # [E, d_k]
        W = editor.weight(layer)
        residual = (z - z_now).to(W.dtype) / (len(layers) - i)              # [E, d_v]
        values = keys.to(W.dtype) @ W + residual
        editor.update(layer, keys, values)
        write_weight(lm, layer, editor.weight(layer))
    return stats
