"""MEMIT's batch least-squares update (Meng et al. 2023), applied afresh at every stream step.

Convention K W ≈ V, W [d_k, d_v]. For one batch with keys K [u, d_k] and residuals
R = V − K W [u, d_v], MEMIT solves

    (λ_m C + KᵀK) ΔW = Kᵀ R

with C = K0ᵀK0 / n0 the *mean* second moment of the anchor keys and λ_m its weight
(`mom2_update_weight`). A typical key's kᵀC⁻¹k is about d_k, so the share of a residual
one key writes depends on d_k / λ_m; `cov_weight_ref_dk` carries a published λ_m to
another width: λ_m = cov_weight · d_k / cov_weight_ref_dk. Nothing of past batches is remembered: in a stream each step only
sees the anchor covariance, which is why MEMIT drifts as edits accumulate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.editors.base import KeyValueEditor


@dataclass
class MEMITArgs:
    cov_weight: float          # λ_m on the mean anchor covariance (MEMIT: mom2_update_weight)
    cov_weight_ref_dk: int | None = None  # d_k that cov_weight was published for (None: as is)
    dtype: str = "float64"     # precision of the solve and of the kept weights


def memit_delta(K: torch.Tensor, R: torch.Tensor, cov_term: torch.Tensor) -> torch.Tensor:
    """ΔW [d_k, d_v] solving (cov_term + KᵀK) ΔW = Kᵀ R; K [u, d_k], R [u, d_v]."""
    lhs = cov_term + K.T @ K
    try:
        chol = torch.linalg.cholesky(lhs)
    except torch.linalg.LinAlgError as err:
        raise ValueError("λ_m C + KᵀK is not positive definite: the anchor covariance is "
                         "rank-deficient (use more anchor texts or a larger cov_weight)") from err
    return torch.cholesky_solve(K.T @ R, chol)


class MEMITEditor(KeyValueEditor):
    """MEMIT per layer: weights plus the fixed term λ_m C [d_k, d_k]."""

    def __init__(self, weights, anchors, args: MEMITArgs):
        super().__init__(weights, args.dtype)
        if args.cov_weight < 0:
            raise ValueError(f"cov_weight must be non-negative, got {args.cov_weight}")
        self.args = args
        self.cov_term = {layer: (self.cov_weight(W0.shape[0]) * anchors[layer].mean_cov
                                 ).to(self.dtype)
                         for layer, W0 in weights.items()}

    def cov_weight(self, d_k: int) -> float:
        """λ_m for keys of width d_k."""
        if self.args.cov_weight_ref_dk is None:
            return self.args.cov_weight
        return self.args.cov_weight * d_k / self.args.cov_weight_ref_dk

    def delta(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return memit_delta(K, V - K @ self.W[layer], self.cov_term[layer])

