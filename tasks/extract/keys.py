"""Keys: the edited projection's input at the subject's last token, averaged over prefixes."""

from __future__ import annotations

import torch

from tasks.extract.hooks import capture, run_until
from tasks.extract.tokens import TokenBatch


def group_mean(rows: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `rows` [B, d] per group id in `groups` [B] -> [n_groups, d]."""
    sums = torch.zeros(n_groups, rows.shape[1], dtype=rows.dtype, device=rows.device)
    sums.index_add_(0, groups, rows)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).to(rows.dtype)
    return sums / counts[:, None]


@torch.no_grad()
def compute_keys(lm, layer: int, batch: TokenBatch, groups: torch.Tensor,
                 n_edits: int) -> torch.Tensor:
    """Keys of `n_edits` edits at `layer` -> [n_edits, d_k].

    Row b of `batch` is one prefixed prompt of edit `groups[b]`; its key is the input of the
    layer's MLP output projection at `batch.lookup[b]`. The forward stops after that layer.
    """
    assert (batch.lookup >= 0).all(), "every key row needs a subject position"
    with capture(lm.mlp_out(layer), "input", stop=True) as seen:
        run_until(lm.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    rows = seen["value"][torch.arange(len(batch.lookup)), batch.lookup]  # [B, d_k]
    return group_mean(rows, groups, n_edits)


@torch.no_grad()
def block_outputs_at(lm, layer: int, batch: TokenBatch) -> torch.Tensor:
    """Residual stream after block `layer` at each row's lookup position -> [B, d]."""
    with capture(lm.block(layer), "output", stop=True) as seen:
        run_until(lm.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    return seen["value"][torch.arange(len(batch.lookup)), batch.lookup]
