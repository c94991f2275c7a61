"""Keys: the edited projection's input at the subject's last token of each prompt.

An edit has several prompts (the bare prompt first, then the prefixed ones); `KeyArgs.mode`
says how their keys become the editor's rows:
- bare_half (default): one row per edit, the bare prompt weighted 1/2 and the prefixed
  prompts sharing the other 1/2 (MEMIT's average over its two template groups); on 300
  tuning edits it wrote 2-4 points more than `mean` at the same perplexity
  (docs/benchmarks.md, "Key modes");
- mean: one row per edit, every prompt's key weighted equally (the bare prompt gets 1/6
  with 5 prefixes; the default before);
- rows: one row per prompt, each with the edit's target value (u = prompts × edits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEY_MODES = ("mean", "bare_half", "rows")


@dataclass
class KeyArgs:
    mode: str = "bare_half"   # bare_half | mean | rows (see the module docstring)

    def __post_init__(self):
        if self.mode not in KEY_MODES:
            raise ValueError(f"keys.mode must be one of {list(KEY_MODES)}, got {self.mode!r}")

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
                 n_edits: int, mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of `n_edits` edits at `layer` -> (keys [R, d_k], edit of each key row [R]).

    Row b of `batch` is one prompt of edit `groups[b]` (the bare prompt first in each edit);
    its key is the input of the layer's MLP output projection at `batch.lookup[b]`. The
    forward stops after that layer. R = n_edits, or B in mode "rows".
    """
    assert (batch.lookup >= 0).all(), "every key row needs a subject position"
    with capture(lm.mlp_out(layer), "input", stop=True) as seen:
        run_until(lm.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    rows = seen["value"][torch.arange(len(batch.lookup)), batch.lookup]  # [B, d_k]
    return mix_keys(rows, groups, n_edits, mode)


def mix_keys(rows: torch.Tensor, groups: torch.Tensor, n_edits: int,
             mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compute_keys' rows: per-prompt keys `rows` [B, d_k] of edits `groups` [B] (the bare
    prompt first in each edit) as `mode` makes them -> (keys [R, d_k], edit of each row [R])."""
    if mode == "rows":
        return rows, groups
    edits = torch.arange(n_edits, device=groups.device)
    if mode == "mean":
        return group_mean(rows, groups, n_edits), edits
    is_bare = torch.ones_like(groups, dtype=torch.bool)
    is_bare[1:] = groups[1:] != groups[:-1]                 # the first row of each edit
    prefixed = group_mean(rows[~is_bare], groups[~is_bare], n_edits)
    has_prefixed = torch.bincount(groups[~is_bare], minlength=n_edits)[:, None] > 0
    bare = rows[is_bare]                                    # [n_edits, d_k], edits in order
    return torch.where(has_prefixed, (bare + prefixed) / 2, bare), edits


@torch.no_grad()
def outputs_at(lm, module: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """`module`'s output at each row's lookup position -> [B, d]; the forward stops there."""
    with capture(module, "output", stop=True) as seen:
        run_until(lm.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    return seen["value"][torch.arange(len(batch.lookup)), batch.lookup]


def block_outputs_at(lm, layer: int, batch: TokenBatch) -> torch.Tensor:
    """Residual stream after block `layer` at each row's lookup position -> [B, d]."""
    return outputs_at(lm, lm.block(layer), batch)
