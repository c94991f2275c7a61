"""Each baseline's update rule against its definition, and RLSEdit's ablations against the
special cases they reduce to. Small float64 problems; seconds."""

import pytest
import torch

from tasks.anchor import AnchorStats
from tasks.config import ConfigError
from tasks.editors import build_editor, editor_registry, resolve_editor
from tasks.editors.alphaedit import AlphaEditArgs, AlphaEditEditor
from tasks.editors.ft import FTArgs, FTEditor
from tasks.editors.memit import MEMITArgs, MEMITEditor

D_K, D_V = 24, 16


def problem(seed=0, anchor_rank=None, n_anchor=300):
    """W0 [D_K, D_V], anchor stats (keys of rank `anchor_rank`, all of D_K if None), generator."""
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(D_K, D_V, generator=gen, dtype=torch.float64)
    rank = anchor_rank or D_K
    basis = torch.randn(rank, D_K, generator=gen, dtype=torch.float64)
    K0 = torch.randn(n_anchor, rank, generator=gen, dtype=torch.float64) @ basis
    return W0, K0, AnchorStats(K0.T @ K0, n_anchor), gen


def batch(gen, u=3):
    return (torch.randn(u, D_K, generator=gen, dtype=torch.float64),
            torch.randn(u, D_V, generator=gen, dtype=torch.float64))


def test_memit_update_solves_its_normal_equations_and_forgets_past_batches():
    W0, _, anchor, gen = problem()
    editor = MEMITEditor({0: W0}, {0: anchor}, MEMITArgs(cov_weight=50.0))
    K, V = batch(gen)
    delta = editor.update(0, K, V)
    R = V - K @ W0
    lhs = 50.0 * anchor.cov / anchor.count + K.T @ K
    torch.testing.assert_close(lhs @ delta, K.T @ R, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(editor.weight(0), W0 + delta)
    # the next batch's system holds no trace of the first one (no memory across steps)
    K2, V2 = batch(gen)
    W1 = editor.weight(0).clone()
    delta2 = editor.update(0, K2, V2)
    lhs2 = 50.0 * anchor.cov / anchor.count + K2.T @ K2
    torch.testing.assert_close(lhs2 @ delta2, K2.T @ (V2 - K2 @ W1), rtol=1e-9, atol=1e-9)


def test_memit_cov_weight_is_carried_to_another_key_width():
    W0, _, anchor, _ = problem()
    scaled = MEMITEditor({0: W0}, {0: anchor}, MEMITArgs(15000, cov_weight_ref_dk=4 * D_K))
    assert scaled.cov_weight(D_K) == pytest.approx(15000 / 4)
    torch.testing.assert_close(scaled.cov_term[0], 3750 * anchor.cov / anchor.count)


def test_alphaedit_leaves_anchor_outputs_unchanged():
    W0, K0, anchor, gen = problem(anchor_rank=10)  # anchors span 10 of 24 directions
    args = AlphaEditArgs(nullspace_threshold=1e-6, l2=1.0)
    editor = AlphaEditEditor({0: W0}, {0: anchor}, args)
    assert editor.null_space_dim(0) == D_K - 10
    for _ in range(3):
        K, V = batch(gen)
        delta = editor.update(0, K, V)
        assert delta.norm() > 1e-3, "the update must write something"
        ratio = (K0 @ delta).norm() / (K0.norm() * delta.norm())
        assert ratio < 1e-6, f"||K0 ΔW|| relative to ||ΔW|| is {ratio:.2e}"


def test_alphaedit_update_solves_its_projected_system_with_past_keys():
    W0, _, anchor, gen = problem(anchor_rank=12)
    editor = AlphaEditEditor({0: W0}, {0: anchor}, AlphaEditArgs(nullspace_threshold=1e-6, l2=2.0))
    P = editor.projector[0]
    torch.testing.assert_close(P @ P, P, rtol=1e-9, atol=1e-9)  # a projector
    K1, V1 = batch(gen)
    editor.update(0, K1, V1)
    torch.testing.assert_close(editor.past_cov[0], K1.T @ K1)
    W1 = editor.weight(0).clone()
    K2, V2 = batch(gen)
    delta = editor.update(0, K2, V2)
    lhs = P @ (K2.T @ K2 + K1.T @ K1) + 2.0 * torch.eye(D_K, dtype=torch.float64)
    torch.testing.assert_close(lhs @ delta, P @ K2.T @ (V2 - K2 @ W1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P @ delta, delta, rtol=1e-9, atol=1e-9)  # inside the null space
    torch.testing.assert_close(editor.past_cov[0], K1.T @ K1 + K2.T @ K2)


def test_alphaedit_keeps_past_edits_better_than_without_their_keys():
    """The past-key term is what holds earlier edits: with it the first batch's outputs move
    less under later batches than when that term is dropped."""
    W0, _, anchor, gen = problem(anchor_rank=6)
    batches = [batch(gen, u=2) for _ in range(4)]
    drift = {}
    for keep_past in (True, False):
        editor = AlphaEditEditor({0: W0}, {0: anchor}, AlphaEditArgs(nullspace_threshold=1e-6, l2=0.1))
        editor.update(0, *batches[0])
        first_out = batches[0][0] @ editor.weight(0)
        for K, V in batches[1:]:
            if not keep_past:
                editor.past_cov[0].zero_()
            editor.update(0, K, V)
        drift[keep_past] = (batches[0][0] @ editor.weight(0) - first_out).norm()
    assert drift[True] < 0.5 * drift[False]


def test_ft_respects_its_linf_bound_and_lowers_the_loss():
    W0, _, _, gen = problem()
    target = torch.randn(D_K, D_V, generator=gen, dtype=torch.float64)
    editor = FTEditor({0: W0.float()}, {}, FTArgs(steps=25, lr=1e-2, norm_bound=0.05,
                                                  early_stop_loss=1e-6))

    def loss_of(weights):
        return (weights[0] - target.float()).pow(2).mean()

    before = loss_of({0: W0.float()}).item()
    deltas = editor.update(loss_of)
    assert deltas[0].abs().max() <= 0.05 + 1e-7
    assert deltas[0].abs().max() > 0.04, "Adam should push some weights to the bound"
    assert loss_of(editor.W).item() < before
    # the bound holds per batch, around the weights the batch started from
    W1 = editor.weight(0).clone()
    deltas = editor.update(loss_of)
    assert (editor.weight(0) - W1).abs().max() <= 0.05 + 1e-7


def test_ft_stops_early_once_the_loss_is_small():
    W0, _, _, _ = problem()
    calls = []
    editor = FTEditor({0: W0.float()}, {}, FTArgs(steps=25, lr=1e-2, norm_bound=1.0,
                                                  early_stop_loss=0.5))

    def loss_of(weights):
        calls.append(1)
        return weights[0].sum() * 0 + 0.1

    deltas = editor.update(loss_of)
    assert len(calls) == 1 and torch.equal(deltas[0], torch.zeros_like(deltas[0]))


def test_rls_mu0_ablation_is_ridge_regression_towards_w0():
    W0, _, anchor, gen = problem()
    editor = build_editor("rlsedit-mu0", {0: W0}, {0: anchor})
    lam = editor.args.lam
    assert editor.args.mu == 0.0
    torch.testing.assert_close(editor.states[0].P, torch.eye(D_K, dtype=torch.float64) / lam)
    K, V = batch(gen)
    delta = editor.update(0, K, V)
    ridge = K.T @ torch.linalg.solve(lam * torch.eye(3, dtype=torch.float64) + K @ K.T, V - K @ W0)
    torch.testing.assert_close(delta, ridge, rtol=1e-9, atol=1e-9)


def test_rls_lam0_ablation_is_least_squares_held_only_by_the_anchors():
    W0, _, anchor, gen = problem()
    editor = build_editor("rlsedit-lam0", {0: W0}, {0: anchor})
    mu = editor.args.mu
    assert editor.args.lam <= 1e-6
    batches = [batch(gen) for _ in range(3)]
    for K, V in batches:
        editor.update(0, K, V)
    lhs = mu * anchor.mean_cov + sum(K.T @ K for K, _ in batches)
    rhs = mu * anchor.mean_cov @ W0 + sum(K.T @ V for K, V in batches)
    torch.testing.assert_close(editor.weight(0), torch.linalg.solve(lhs, rhs), rtol=1e-5, atol=1e-5)


def test_rls_with_both_regularisers_off_writes_edits_exactly():
    W0, _, anchor, gen = problem()
    editor = build_editor("rlsedit", {0: W0}, {0: anchor}, {"lam": 1e-9, "mu": 0.0})
    K, V = batch(gen)
    editor.update(0, K, V)
    torch.testing.assert_close(K @ editor.weight(0), V, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(editor_registry()))
def test_every_registered_editor_builds_updates_and_round_trips_its_state(name):
    W0, _, anchor, gen = problem()
    editor = build_editor(name, {0: W0}, {0: anchor})
    if editor.needs == "loss":
        editor.update(lambda w: (w[0] - 1).pow(2).mean())
    else:
        editor.update(0, *batch(gen))
    state = editor.state_dict()
    copy = build_editor(name, {0: W0}, {0: anchor})
    copy.load_state_dict(state)
    assert torch.equal(copy.weight(0), editor.weight(0))
    assert not torch.equal(editor.weight(0).to(W0.dtype), W0)


def test_unknown_editor_or_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown editor 'rome'.*alphaedit"):
        resolve_editor("rome")
    with pytest.raises(ConfigError, match=r"editor_args\.lamda"):
        resolve_editor("rlsedit", {"lamda": 1.0})


def test_a_rejected_batch_leaves_a_baseline_untouched():
    W0, _, anchor, gen = problem()
    editor = build_editor("memit", {0: W0}, {0: anchor})
    K, V = batch(gen)
    K[0, 0] = float("inf")
    with pytest.raises(ValueError, match="K holds 1 NaN/Inf"):
        editor.update(0, K, V)
    assert torch.equal(editor.weight(0), W0)


def test_alphaedit_refuses_an_empty_null_space():
    W0, _, anchor, _ = problem()  # full-rank anchors, eigenvalues far above 1e-9
    with pytest.raises(ValueError, match="no eigenvalue of the mean anchor covariance is below "
                                         "1e-09"):
        AlphaEditEditor({0: W0}, {0: anchor}, AlphaEditArgs(nullspace_threshold=1e-9, l2=1.0))


def test_alphaedit_relative_threshold_cuts_the_spectrum_at_a_share_of_its_mean():
    W0, _, anchor, _ = problem(anchor_rank=12)
    eigenvalues = torch.linalg.eigvalsh(anchor.mean_cov)
    rel = 1e-6
    editor = AlphaEditEditor({0: W0}, {0: anchor}, AlphaEditArgs(l2=1.0, nullspace_rel=rel))
    assert editor.null_space_dim(0) == int((eigenvalues < rel * eigenvalues.mean()).sum()) == 12
    scaled = AnchorStats(anchor.cov * 1000.0, anchor.count)   # same directions, larger keys
    same = AlphaEditEditor({0: W0}, {0: scaled}, AlphaEditArgs(l2=1.0, nullspace_rel=rel))
    assert same.null_space_dim(0) == editor.null_space_dim(0)
    with pytest.raises(ValueError, match="nullspace_rel"):
        AlphaEditArgs(l2=1.0)


def test_the_editor_registry_is_read_once_and_handed_out_as_copies(monkeypatch):
    from pathlib import Path

    import tasks.editors

    tasks.editors.editor_registry()
    monkeypatch.setattr(Path, "read_text", lambda *_: pytest.fail("editors.yaml read again"))
    mine = tasks.editors.editor_registry()
    mine["rlsedit"]["mu"] = -1.0
    del mine["memit"]
    again = tasks.editors.editor_registry()
    assert again["rlsedit"]["mu"] != -1.0 and "memit" in again
    assert resolve_editor("rlsedit")[2]["mu"] == again["rlsedit"]["mu"]
