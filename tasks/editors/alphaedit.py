"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the anchor keys.

Convention K W ≈ V, W [d_k, d_v]. With C = K0ᵀK0 / n0 the mean anchor covariance, the
projector P̂ = U₀U₀ᵀ [d_k, d_k] spans the eigenvectors of C whose eigenvalues are below
a threshold: `nullspace_rel` × C's mean eigenvalue tr(C)/d_k (relative to the spectrum, so
it means the same on any model; the mean, not the largest, since one dominant direction
would move a cut tied to the largest: Gemma-3-270M's layer 4 has a top eigenvalue 490×
its mean), or an absolute `nullspace_threshold` as AlphaEdit publishes it (2e-2 for
Llama3-8B, which on smollm2 puts 1,088 of 1,536 directions in the null space). For a batch K [u, d_k], residuals R = V − K W [u, d_v] and the keys
of all past edits accumulated as C_past = Σ K_iᵀK_i, the update is

    (P̂ (KᵀK + C_past) + l2·I) ΔW = P̂ Kᵀ R

whose solution lies in the range of P̂, so K0 ΔW ≈ 0: the anchor keys' outputs stay put.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.editors.base import KeyValueEditor


@dataclass
class AlphaEditArgs:
    l2: float                    # weight of ||ΔW||² (AlphaEdit: L2)
    nullspace_rel: float | None = None        # P̂: eigenvalues < this × their mean, unless
    nullspace_threshold: float | None = None  # an absolute cut is given (it takes precedence)
    dtype: str = "float64"

    def __post_init__(self):
        if self.nullspace_rel is None and self.nullspace_threshold is None:
            raise ValueError("AlphaEdit needs editor_args.nullspace_rel (relative to the "
                             "mean anchor eigenvalue) or editor_args.nullspace_threshold")

    def threshold(self, eigenvalues: torch.Tensor) -> float:
        """The absolute cut on the eigenvalues [d_k] of the mean anchor covariance."""
        if self.nullspace_threshold is not None:
            return self.nullspace_threshold
        return self.nullspace_rel * float(eigenvalues.mean())


def null_space_projector(mean_cov: torch.Tensor, args: AlphaEditArgs) -> torch.Tensor:
    """P̂ [d_k, d_k]: projector onto the eigenvectors of `mean_cov` [d_k, d_k] whose
    eigenvalue is under `args.threshold` (the near-null space of the anchor keys)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(mean_cov)
    basis = eigenvectors[:, eigenvalues < args.threshold(eigenvalues)]   # [d_k, r]
    return basis @ basis.T


def alphaedit_delta(K: torch.Tensor, R: torch.Tensor, projector: torch.Tensor,
                    past_cov: torch.Tensor, l2: float) -> torch.Tensor:
    """ΔW [d_k, d_v] solving (P̂(KᵀK + past_cov) + l2 I) ΔW = P̂ Kᵀ R."""
    lhs = projector @ (K.T @ K + past_cov)
    lhs.diagonal().add_(l2)
    return torch.linalg.solve(lhs, projector @ (K.T @ R))


class AlphaEditEditor(KeyValueEditor):
    """AlphaEdit per layer: weights, the null-space projector and the past edits' KᵀK."""

    def __init__(self, weights, anchors, args: AlphaEditArgs):
        super().__init__(weights, args.dtype)
        if args.l2 <= 0:
            raise ValueError(f"l2 must be positive (the solve needs it), got {args.l2}")
        self.args = args
        self.projector = {layer: null_space_projector(anchors[layer].mean_cov.to(self.dtype), args)
                          for layer in weights}
        self.past_cov = {layer: torch.zeros_like(self.projector[layer]) for layer in weights}
        for layer in weights:
            if self.null_space_dim(layer) == 0:
                eigenvalues = torch.linalg.eigvalsh(anchors[layer].mean_cov)
                raise ValueError(
                    f"layer {layer}: no eigenvalue of the mean anchor covariance is below "
                    f"{args.threshold(eigenvalues):.3g} (the smallest is "
                    f"{float(eigenvalues[0]):.3g}), so AlphaEdit could write nothing; raise "
                    f"editor_args.nullspace_rel or nullspace_threshold")

    def null_space_dim(self, layer: int) -> int:
        return int(round(float(self.projector[layer].trace())))

    def delta(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return alphaedit_delta(K, V - K @ self.W[layer], self.projector[layer],
                               self.past_cov[layer], self.args.l2)

    def after_update(self, layer: int, K: torch.Tensor) -> None:
        self.past_cov[layer] = self.past_cov[layer] + K.T @ K

    def extra_state(self) -> dict:
        return {"past_cov": dict(self.past_cov)}

    def load_extra_state(self, state: dict) -> None:
        self.past_cov = {int(layer): c for layer, c in state["past_cov"].items()}
