import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks.editors.rls import RLSLayerState


def closed_form(W0, anchor_cov, lam, mu, batches):
    """(λI + μC0 + ΣKᵢᵀKᵢ)⁻¹(λW0 + μC0W0 + ΣKᵢᵀVᵢ), all in float64."""
    d_k = W0.shape[0]
    lhs = lam * torch.eye(d_k, dtype=torch.float64) + mu * anchor_cov
    rhs = lam * W0 + mu * anchor_cov @ W0
    for K, V in batches:
        lhs = lhs + K.T @ K
        rhs = rhs + K.T @ V
    return torch.linalg.solve(lhs, rhs), torch.linalg.inv(lhs)


def random_problem(d_k=24, d_v=16, n_anchor=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_k, d_v, generator=gen, dtype=torch.float64)
    K0 = torch.randn(n_anchor, d_k, generator=gen, dtype=torch.float64)
    return W0, K0.T @ K0, gen


@pytest.mark.parametrize("lam,mu,batch", [(1.0, 0.01, 1), (0.5, 0.1, 3), (1.0, 0.0, 5)])
def test_recursion_equals_closed_form_after_hundreds_of_updates(lam, mu, batch):
    W0, anchor_cov, gen = random_problem()
    state = RLSLayerState.init(W0, anchor_cov, lam, mu)
    batches = []
    for _ in range(300):
        K = torch.randn(batch, W0.shape[0], generator=gen, dtype=torch.float64)
        V = torch.randn(batch, W0.shape[1], generator=gen, dtype=torch.float64)
        state.update(K, V)
        batches.append((K, V))
    W_star, P_star = closed_form(W0, anchor_cov, lam, mu, batches)
    assert state.n_updates == 300
    torch.testing.assert_close(state.W, W_star, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(state.P, P_star, rtol=1e-8, atol=1e-10)
    assert torch.equal(state.P, state.P.T), "P must stay exactly symmetric"


def test_update_fits_its_batch_and_keeps_the_old_solution_nearby():
    W0, anchor_cov, gen = random_problem()
    state = RLSLayerState.init(W0, anchor_cov, lam=1e-4, mu=0.0)
    K = torch.randn(2, W0.shape[0], generator=gen, dtype=torch.float64)
    V = torch.randn(2, W0.shape[1], generator=gen, dtype=torch.float64)
    state.update(K, V)
    # with λ → 0 and no anchor term the new values are written almost exactly
    torch.testing.assert_close(K @ state.W, V, rtol=1e-3, atol=1e-3)


def _flops_of_one_update(state, gen):
    K = torch.randn(4, state.W.shape[0], generator=gen, dtype=torch.float64)
    V = torch.randn(4, state.W.shape[1], generator=gen, dtype=torch.float64)
    counter = FlopCounterMode(display=False)
    with counter:
        state.update(K, V)
    return counter.get_total_flops()


def test_update_cost_is_flat_in_history():
    W0, anchor_cov, gen = random_problem(d_k=64, d_v=32)
    state = RLSLayerState.init(W0, anchor_cov, lam=1.0, mu=0.01)
    for _ in range(10):
        state.update(torch.randn(4, 64, generator=gen, dtype=torch.float64),
                     torch.randn(4, 32, generator=gen, dtype=torch.float64))
    early = _flops_of_one_update(state, gen)
    for _ in range(500):
        state.update(torch.randn(4, 64, generator=gen, dtype=torch.float64),
                     torch.randn(4, 32, generator=gen, dtype=torch.float64))
    late = _flops_of_one_update(state, gen)
    assert early > 0 and late == early
    # and the state does not grow with the history
    assert state.P.shape == (64, 64) and state.W.shape == (64, 32)


def test_state_defaults_to_float64_and_can_be_float32():
    W0, anchor_cov, _ = random_problem()
    assert RLSLayerState.init(W0.float(), anchor_cov.float(), 1.0, 0.01).P.dtype == torch.float64
    state32 = RLSLayerState.init(W0, anchor_cov, 1.0, 0.01, dtype=torch.float32)
    assert state32.W.dtype == torch.float32 and state32.P.dtype == torch.float32


def test_bad_inputs_give_clear_errors():
    W0, anchor_cov, _ = random_problem()
    state = RLSLayerState.init(W0, anchor_cov, 1.0, 0.01)
    with pytest.raises(ValueError, match=r"K must be \[u, 24\]"):
        state.update(torch.zeros(2, 5), torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"V must be \[2, 16\]"):
        state.update(torch.zeros(2, 24), torch.zeros(3, 16))
    bad = torch.zeros(1, 24)
    bad[0, 3] = float("nan")
    W_before = state.W.clone()
    with pytest.raises(ValueError, match="K holds 1 NaN/Inf"):
        state.update(bad, torch.zeros(1, 16))
    assert torch.equal(state.W, W_before), "a rejected update must leave the state untouched"
    inf_values = torch.zeros(1, 16)
    inf_values[0, 7] = float("-inf")
    with pytest.raises(ValueError, match="V holds 1 NaN/Inf"):
        state.update(torch.ones(1, 24), inf_values)
    assert torch.equal(state.W, W_before) and state.n_updates == 0
    with pytest.raises(ValueError, match="anchor_cov must be"):
        RLSLayerState.init(W0, anchor_cov[:3, :3], 1.0, 0.01)
    with pytest.raises(ValueError, match="not positive definite"):
        RLSLayerState.init(W0, torch.zeros(24, 24, dtype=torch.float64), 0.0, 0.0)


def test_state_dict_round_trip():
    W0, anchor_cov, gen = random_problem()
    state = RLSLayerState.init(W0, anchor_cov, 1.0, 0.01)
    state.update(torch.randn(3, 24, generator=gen, dtype=torch.float64),
                 torch.randn(3, 16, generator=gen, dtype=torch.float64))
    copy = RLSLayerState.from_state_dict(state.state_dict())
    assert copy.n_updates == 1 and copy.n_keys == 3
    assert torch.equal(copy.W, state.W) and torch.equal(copy.P, state.P)


def test_finiteness_check_catches_inf_of_both_signs_and_passes_overflowing_sums():
    from tasks.editors.base import check_finite

    values = torch.zeros(3, 4, dtype=torch.float64)
    values[0, 1], values[2, 3] = float("inf"), float("-inf")   # their sum is NaN
    with pytest.raises(ValueError, match="x holds 2 NaN/Inf values"):
        check_finite("x", values)
    check_finite("y", torch.full((4,), 1e308, dtype=torch.float64))   # finite, sum overflows


def test_deviation_budget_picks_the_anchor_weight_its_prediction_needs():
    """The predictor's first-batch change equals a real RLS update's; the chosen μ meets
    the budget with the least anchor; a tighter budget needs a larger μ; the editor starts
    each layer at its first batch with that μ and checkpoints the choice."""
    from tasks.anchor import AnchorStats
    from tasks.editors.budget import DeviationPredictor, anchor_weight_for_budget
    from tasks.editors.rls import RLSArgs, RLSEditor, RLSLayerState

    g = torch.Generator().manual_seed(0)
    keys0 = torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 12)
    anchor = AnchorStats(keys0.T @ keys0, 500)
    W0 = torch.randn(12, 5, generator=g, dtype=torch.float64)
    K = torch.randn(3, 12, generator=g, dtype=torch.float64)
    R = torch.randn(3, 5, generator=g, dtype=torch.float64)
    predictor = DeviationPredictor(anchor.mean_cov, W0, K, R, lam=0.5)
    state = RLSLayerState.init(W0, anchor.mean_cov, 0.5, 7.0)
    state.update(K, K @ W0 + R)
    assert abs(predictor.first_batch(7.0) - anchor.deviation(state.W, W0)) < 1e-9
    loose = anchor_weight_for_budget(predictor, 0.5, batches=20)
    tight = anchor_weight_for_budget(predictor, 0.05, batches=20)
    assert tight.mu > loose.mu
    for choice, budget in ((loose, 0.5), (tight, 0.05)):
        assert choice.predicted_deviation <= budget
        assert predictor.after(20, choice.mu * 0.99) > budget      # no smaller μ would do

    editor = RLSEditor({3: W0}, {3: anchor}, RLSArgs(lam=0.5, mu=1.0, deviation_budget=0.05,
                                                     planned_batches=20))
    assert torch.equal(editor.weight(3), W0) and editor.logged_settings() == {}
    editor.update(3, K, K @ W0 + R)
    assert abs(editor.logged_settings()["budget_mu.L3"] - tight.mu) < 1e-6 * tight.mu
    copy = RLSEditor({3: W0}, {3: anchor}, RLSArgs(lam=0.5, mu=1.0, deviation_budget=0.05,
                                                   planned_batches=20))
    copy.load_state_dict(editor.state_dict())
    assert copy.logged_settings() == editor.logged_settings()
    assert torch.equal(copy.weight(3), editor.weight(3))
    with pytest.raises(ValueError, match="planned_batches"):
        RLSEditor({3: W0}, {3: anchor}, RLSArgs(lam=0.5, mu=1.0, deviation_budget=0.05))


def test_the_editor_reads_the_state_dicts_of_older_versions():
    """Checkpoints from before the editors shared one state dict ({"states", "pending",
    "budget_choices"}) and from before the deviation budget ({layer: layer state})."""
    import io

    from tasks.anchor import AnchorStats
    from tasks.editors.rls import RLSArgs, RLSEditor

    W0, anchor_cov, gen = random_problem()
    anchors = {1: AnchorStats(anchor_cov, 200), 2: AnchorStats(anchor_cov, 200)}
    editor = RLSEditor({1: W0, 2: W0}, anchors, RLSArgs(lam=1.0, mu=0.01))
    editor.update(1, torch.randn(3, 24, generator=gen, dtype=torch.float64),
                  torch.randn(3, 16, generator=gen, dtype=torch.float64))
    layer_states = editor.extra_state()["states"]
    for old in (layer_states, {"states": {1: layer_states[1]}, "pending": {2: W0},
                               "budget_choices": {}}):
        copy = RLSEditor({1: W0, 2: W0}, anchors, RLSArgs(lam=1.0, mu=0.01))
        copy.load_state_dict(old)
        assert all(torch.equal(copy.weight(l), editor.weight(l)) for l in (1, 2))
        assert copy.weight(1) is copy.states[1].W and copy.states[1].n_updates == 1
    saved = {name: io.BytesIO() for name in ("all", "states")}
    torch.save(editor.state_dict(), saved["all"])   # each W once, in "W" and in "states"
    torch.save(layer_states, saved["states"])
    assert len(saved["all"].getvalue()) < len(saved["states"].getvalue()) + 1000
