"""RLSEdit: recursive least squares over a stream of edit batches (arXiv 2601.15686).

Math convention K W ≈ V, with W = linear.weight.T of shape [d_k, d_v]. After batches
(K_1, V_1) .. (K_n, V_n), W is the minimiser of

    Σ_i ||K_i W − V_i||² + λ ||W − W0||²_F + μ ||K0 W − K0 W0||²_F / n0,

i.e. W = P (λ W0 + μ C̄0 W0 + Σ K_iᵀ V_i) with P = (λ I + μ C̄0 + Σ K_iᵀ K_i)⁻¹ and
C̄0 = K0ᵀK0 / n0 the *mean* anchor-key covariance (n0 anchor tokens): μ weighs the anchor
as MEMIT's mom2_update_weight and the paper's w do, independent of the corpus size. Each batch is folded in by the Woodbury identity:

    S = I + K P Kᵀ                [u, u], Cholesky-solved
    G = P Kᵀ S⁻¹                  [d_k, u]
    W ← W + G (V − K W)
    P ← P − G K P = P − XᵀX,      X = L⁻¹ K P with S = L Lᵀ

O(d_k² u + d_k d_v u) per batch, whatever the number of batches before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.editors.base import KeyValueEditor, check_batch, check_finite
from tasks.editors.budget import BudgetChoice, DeviationPredictor, anchor_weight_for_budget

RESYMMETRIZE_EVERY = 256   # updates between (P + Pᵀ)/2; on CPU P − XᵀX stays exactly symmetric


@dataclass
class RLSLayerState:
    """The recursion state of one edited layer: W [d_k, d_v] and P [d_k, d_k]."""

    W: torch.Tensor
    P: torch.Tensor
    n_updates: int = 0
    n_keys: int = 0

    @classmethod
    def init(cls, W0: torch.Tensor, anchor_cov: torch.Tensor, lam: float, mu: float,
             dtype: torch.dtype = torch.float64) -> "RLSLayerState":
        """Start from W0 [d_k, d_v] with P = (λI + μ anchor_cov)⁻¹, anchor_cov [d_k, d_k]
        (the editor passes the mean anchor covariance C̄0)."""
        d_k = W0.shape[0]
        if anchor_cov.shape != (d_k, d_k):
            raise ValueError(f"anchor_cov must be [{d_k}, {d_k}] for W0 {tuple(W0.shape)}, "
                             f"got {tuple(anchor_cov.shape)}")
        if lam < 0 or mu < 0:
            raise ValueError(f"lam and mu must be non-negative, got lam={lam}, mu={mu}")
        check_finite("W0", W0)
        check_finite("anchor_cov", anchor_cov)
        W = W0.detach().to(dtype).clone()
        precision = mu * anchor_cov.detach().to(device=W.device, dtype=dtype)
        precision.diagonal().add_(lam)
        try:
            chol = torch.linalg.cholesky(precision)
        except torch.linalg.LinAlgError as err:
            raise ValueError(
                f"λI + μ·anchor_cov is not positive definite (lam={lam}, mu={mu}); "
                f"use lam > 0 or more anchor samples") from err
        del precision               # at most two d_k × d_k matrices alive from here on
        P = torch.cholesky_inverse(chol)
        del chol
        P = P + P.T
        return cls(W=W, P=P.mul_(0.5))

    def update(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Fold in one batch: K [u, d_k] keys, V [u, d_v] target values, checked first
        (`check_batch`). Returns ΔW [d_k, d_v]."""
        check_batch(K, V, *self.W.shape)
        return self.fold(K.to(self.W), V.to(self.W))

    def fold(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Fold in a checked batch, K [u, d_k] and V [u, d_v] in W's dtype and device; W
        and P are updated in place. Returns ΔW [d_k, d_v].

        With S = L Lᵀ and X = L⁻¹ K P [u, d_k], the P update is the symmetric rank-u
        downdate P − Xᵀ X, applied in place (one pass over P, no d_k × d_k temporary).
        Every check runs on the small factors before the state is touched, so a rejected
        batch leaves W and P as they were."""
        KP = K @ self.P                                     # [u, d_k] = (P Kᵀ)ᵀ, P symmetric
        S = KP @ K.T                                        # [u, u]
        S.diagonal().add_(1.0)
        chol, info = torch.linalg.cholesky_ex(S)
        if info.item() != 0 or not torch.isfinite(chol).all():
            raise ValueError("I + K P Kᵀ is not positive definite: P has lost definiteness "
                             "(use float64 state or a larger lam)")
        X = torch.linalg.solve_triangular(chol, KP, upper=False)          # L⁻¹ K P
        gain_t = torch.linalg.solve_triangular(chol.mT, X, upper=True)   # Gᵀ = S⁻¹ K P
        delta_W = gain_t.T @ (V - K @ self.W)               # [d_k, d_v]
        check_finite("updated W", delta_W)
        # diag(P − XᵀX) bounds every entry of the downdate (Cauchy–Schwarz): finite and
        # positive here means the new P is finite and keeps a positive diagonal
        new_diag = self.P.diagonal() - X.square().sum(0)
        check_finite("updated P", new_diag)
        if not (new_diag > 0).all():
            raise ValueError(f"the update would leave P with {int((new_diag <= 0).sum())} "
                             f"non-positive diagonal entries (P is ill-conditioned: use "
                             f"float64 state or a larger lam)")
        self.P.addmm_(X.T, X, alpha=-1.0)
        self.W.add_(delta_W)
        self.n_updates += 1
        self.n_keys += K.shape[0]
        if self.n_updates % RESYMMETRIZE_EVERY == 0:   # the BLAS may round Xᵀ X unevenly
            self.P = (self.P + self.P.T) / 2
        return delta_W

    def state_dict(self) -> dict:
        """The live W and P (updated in place: save or clone them before the next update)."""
        return {"W": self.W, "P": self.P, "n_updates": self.n_updates, "n_keys": self.n_keys}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RLSLayerState":
        """A state of its own: W and P are copied, never shared with `state`."""
        return cls(W=state["W"].clone(), P=state["P"].clone(), n_updates=int(state["n_updates"]),
                   n_keys=int(state["n_keys"]))


@dataclass
class RLSArgs:
    """RLSEdit's regularisers. lam: pull towards W0; mu: weight of the mean anchor
    covariance C̄0 = K0ᵀK0 / n0 (the paper's w, MEMIT's mom2_update_weight)."""

    lam: float
    mu: float
    dtype: str = "float64"  # state precision; float32 drifts over long streams
    deviation_budget: float | None = None  # when set, μ is chosen per layer at the first
                                           # batch so that the predicted anchor deviation
                                           # after `planned_batches` stays within it
    planned_batches: int | None = None     # set by the stream: batches in the run


class RLSEditor(KeyValueEditor):
    """RLSEdit over several layers: one `RLSLayerState` per edited layer, whose W is the
    editor's W of that layer (one tensor, which the state updates in place).

    With `deviation_budget`, a layer's state starts at its first batch, with the μ that
    `anchor_weight_for_budget` picks from that batch (`budget_choices`); until then the
    layer's weight is W0."""

    def __init__(self, weights: dict[int, torch.Tensor], anchors: dict, args: RLSArgs):
        """`weights[l]` is W0 [d_k, d_v] of layer l, `anchors[l]` its AnchorStats."""
        super().__init__(weights, args.dtype)
        self.args = args
        self.anchors = anchors
        self.budget_choices: dict[int, BudgetChoice] = {}
        self.states: dict[int, RLSLayerState] = {}   # a layer without one waits for its μ
        if args.deviation_budget is None:
            for layer in self.W:
                self._start(layer, args.mu)
        elif not args.planned_batches:
            raise ValueError("editor_args.deviation_budget needs planned_batches (the stream "
                             "sets it from num_edits and batch_size)")

    def _start(self, layer: int, mu: float) -> None:
        """The recursion of `layer` from its W0 now, with anchor weight `mu`."""
        state = RLSLayerState.init(self.W[layer], self.anchors[layer].mean_cov, self.args.lam,
                                   mu, self.dtype)
        self.states[layer] = state
        self.W[layer] = state.W

    def fold(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """`RLSLayerState.fold` of a checked batch K [u, d_k], V [u, d_v]; a layer waiting
        for its budget's μ starts first. Returns ΔW [d_k, d_v]."""
        if layer not in self.states:
            self._choose_mu(layer, K, V)
        return self.states[layer].fold(K, V)

    def _choose_mu(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> None:
        W0 = self.W[layer]
        predictor = DeviationPredictor(self.anchors[layer].mean_cov, W0, K, V - K @ W0,
                                       self.args.lam)
        choice = anchor_weight_for_budget(predictor, self.args.deviation_budget,
                                          self.args.planned_batches)
        self._start(layer, choice.mu)
        self.budget_choices[layer] = choice

    def logged_settings(self) -> dict[str, float]:
        """`budget_mu.L<layer>` and `budget_predicted_deviation.L<layer>` once chosen."""
        out = {}
        for layer, choice in self.budget_choices.items():
            out[f"budget_mu.L{layer}"] = choice.mu
            out[f"budget_predicted_deviation.L{layer}"] = choice.predicted_deviation
        return out

    def extra_state(self) -> dict:
        """Each started layer's recursion state (its W is the one in "W": saved once) and
        the budget's choices."""
        return {"states": {layer: state.state_dict() for layer, state in self.states.items()},
                "budget_choices": {layer: vars(c) for layer, c in self.budget_choices.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.states = {int(layer): RLSLayerState.from_state_dict(s)
                       for layer, s in state["states"].items()}
        for layer, layer_state in self.states.items():
            self.W[layer] = layer_state.W
        self.budget_choices = {int(layer): BudgetChoice(**c)
                               for layer, c in state["budget_choices"].items()}

    def load_state_dict(self, state: dict) -> None:
        """Also reads the checkpoints of older versions (`with_weights`)."""
        super().load_state_dict(with_weights(state))


def with_weights(state: dict) -> dict:
    """An `RLSEditor.state_dict` as written now from one of before the editors shared
    theirs: {"states", "pending": {layer: W0}, "budget_choices"}, or from before the
    deviation budget: {layer: layer state}."""
    if "W" in state:
        return state
    if "states" not in state:
        state = {"states": state, "pending": {}, "budget_choices": {}}
    weights = {**state["pending"], **{layer: s["W"] for layer, s in state["states"].items()}}
    return {"W": weights, "states": state["states"], "budget_choices": state["budget_choices"]}
