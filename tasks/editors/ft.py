"""FT-L: constrained fine-tuning of the edit layers' MLP output projections (the ROME/MEMIT
baseline). A few Adam steps on the batch's target-token loss; after every step each weight
is clipped back into an L∞ ball of radius `norm_bound` around its value before the batch:

    W ← clip(W − Adam(∇ loss(W)), W_before − ε, W_before + ε)

The loss itself (teacher-forced NLL of `target_new` after each edit prompt) is built by the
edit step from the model; here it is only a function of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tasks.editors.base import LayerWeights, check_finite


@dataclass
class FTArgs:
    steps: int               # Adam steps per batch
    lr: float
    norm_bound: float        # ε: L∞ bound on W − W_before per batch
    early_stop_loss: float   # stop once the batch loss is below this
    dtype: str = "float32"   # the model's own precision: gradients flow through it


class FTEditor(LayerWeights):
    """Fine-tunes W [d_k, d_v] of every edit layer jointly, one batch at a time."""

    needs = "loss"

    def __init__(self, weights: dict[int, torch.Tensor], anchors, args: FTArgs):
        """`anchors` is accepted for a uniform interface; FT does not use it."""
        if args.norm_bound < 0 or args.steps < 1:
            raise ValueError(f"FT needs norm_bound >= 0 and steps >= 1, got {args}")
        super().__init__(weights, args.dtype)
        self.args = args
        self.last_loss = float("nan")

    def update(self, loss_of: Callable[[dict[int, torch.Tensor]], torch.Tensor]
               ) -> dict[int, torch.Tensor]:
        """Run the constrained Adam steps on `loss_of({layer: W})`; returns {layer: ΔW}."""
        before = {layer: W.clone() for layer, W in self.W.items()}
        params = {layer: W.clone().requires_grad_(True) for layer, W in self.W.items()}
        opt = torch.optim.Adam(params.values(), lr=self.args.lr)
        eps = self.args.norm_bound
        for _ in range(self.args.steps):
            opt.zero_grad()
            loss = loss_of(params)
            if not torch.isfinite(loss):
                raise ValueError("FT loss is NaN/Inf; refusing to update the editor state")
            self.last_loss = float(loss.detach())
            if self.last_loss < self.args.early_stop_loss:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                for layer, W in params.items():
                    W.copy_(torch.clamp(W, before[layer] - eps, before[layer] + eps))
        for layer, W in params.items():
            check_finite("updated W", W.detach())
        self.W = {layer: W.detach() for layer, W in params.items()}
        return {layer: self.W[layer] - before[layer] for layer in self.W}
