"""The margin stop's ground-truth scores: a one-token truth read from its target_new row's
logits is the score a replay of the truth row gives (smollm2-135m, whose CounterFact truths
are mostly one token; the tiny models' byte tokenizer has none)."""

import dataclasses

import pytest
import torch

from tasks.data import load_requests
from tasks.extract import values
from tasks.extract.prompts import kl_batch, make_context_templates, rewrite_batch
from tasks.models import load_model
from tests.conftest import EDIT_DATA

MARGIN = values.ValueArgs(stop_on="margin", margin=2.0, steps=4)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def optimise(lm, requests, args=MARGIN, init=None, avoid=None):
    templates = make_context_templates(lm, 2, args.prefix_tokens, seed=0)
    rewrite, groups = rewrite_batch(lm.tokenizer, requests, templates)
    truth = rewrite_batch(lm.tokenizer, requests, templates, "ground_truth")[0]
    return values.compute_target_values(lm, lm.spec.edit_layers[-1], rewrite, groups,
                                        kl_batch(lm.tokenizer, requests), args, truth, init,
                                        avoid)


def test_a_delta_started_where_the_stop_rule_holds_takes_no_step(smollm2):
    """`init` (the warm start `bench.value_stops` measures) is where the delta starts: an
    edit started at its own optimised delta stops before any step and keeps that delta."""
    torch.manual_seed(0)
    requests = load_requests(EDIT_DATA, limit=1)
    args = dataclasses.replace(MARGIN, steps=25)
    cold = optimise(smollm2, requests, args)
    assert cold.converged.item() == 1 and cold.steps.item() > 0
    warm = optimise(smollm2, requests, args, init=cold.delta[0])
    assert warm.steps.item() == 0 and warm.converged.item() == 1
    torch.testing.assert_close(warm.delta, cold.delta)
    torch.testing.assert_close(warm.margin, cold.margin, atol=1e-4, rtol=1e-5)


def test_one_token_truths_score_as_their_own_replay(smollm2, monkeypatch):
    torch.manual_seed(0)
    requests = load_requests(EDIT_DATA, limit=4)
    shared = []
    found = values._DeltaLoss._one_token_truths

    def spy(self):
        source, token = found(self)
        shared.append(int((source >= 0).sum()))
        return source, token

    monkeypatch.setattr(values._DeltaLoss, "_one_token_truths", spy)
    read = optimise(smollm2, requests)
    assert sum(shared) > 0, "no truth row took the shared path"

    monkeypatch.setattr(values._DeltaLoss, "_one_token_truths",
                        lambda self: (torch.full_like(self.rows, -1), torch.zeros_like(self.rows)))
    replayed = optimise(smollm2, requests)
    torch.testing.assert_close(read.margin, replayed.margin, atol=1e-4, rtol=1e-5)
    assert torch.equal(read.steps, replayed.steps)
    torch.testing.assert_close(read.delta, replayed.delta, atol=1e-4, rtol=1e-4)


def test_bfloat16_replays_find_the_float32_deltas(smollm2):
    """`values.autocast: bfloat16` (issue 15) steers the same Adam steps: per-edit deltas
    within a few degrees of float32's, margins within a tenth of a nat, and the model's
    own weights left in float32."""
    torch.manual_seed(0)
    requests = load_requests(EDIT_DATA, limit=4)
    full = optimise(smollm2, requests)
    half = optimise(smollm2, requests, dataclasses.replace(MARGIN, autocast="bfloat16"))
    cosine = torch.nn.functional.cosine_similarity(full.delta, half.delta, dim=1)
    assert cosine.min() > 0.99, cosine
    torch.testing.assert_close(half.margin, full.margin, atol=0.1, rtol=0)
    assert half.delta.dtype == torch.float32
    assert {p.dtype for p in smollm2.model.parameters()} == {torch.float32}


def test_unknown_autocast_dtype_is_refused():
    with pytest.raises(ValueError, match="values.autocast"):
        values.ValueArgs(autocast="int8")


def test_an_overshooting_step_lands_back_on_the_margin(smollm2):
    """`values.overshoot: interpolate` takes the same Adam steps and then moves each delta
    back along its last step: shorter, written at a margin nearer 2 nats than the step's end
    (re-scored, not the interpolation's guess), and never under the 1 nat the second write
    checks on these edits."""
    torch.manual_seed(0)
    requests = load_requests(EDIT_DATA, limit=4)
    args = dataclasses.replace(MARGIN, steps=25)
    kept = optimise(smollm2, requests, args)
    landed = optimise(smollm2, requests, dataclasses.replace(args, overshoot="interpolate"))
    assert torch.equal(kept.steps, landed.steps) and (kept.steps > 0).all()
    assert (landed.delta.norm(dim=1) < kept.delta.norm(dim=1)).all()
    assert (landed.margin < kept.margin).all() and (landed.margin > 1.0).all()
    assert ((landed.margin - 2).abs() < (kept.margin - 2).abs()).all(), (landed.margin, kept.margin)


def test_landing_on_the_margin_needs_the_margin_stop():
    with pytest.raises(ValueError, match="overshoot"):
        values.ValueArgs(stop_on="nll", overshoot="interpolate")


def test_normalized_gradient_steps_have_their_set_length_and_descend(smollm2):
    """`values.optimizer: ngd`: one step moves each delta exactly `ngd_step` × ‖z‖ (no clamp
    binds), against its gradient: the target NLL falls. Run to the stop, the edits meet the
    2-nat margin with shorter deltas than Adam's on the same edits (the point of the rule)."""
    torch.manual_seed(0)
    requests = load_requests(EDIT_DATA, limit=4)
    ngd = dataclasses.replace(MARGIN, optimizer="ngd", ngd_step=0.05)
    start = optimise(smollm2, requests, dataclasses.replace(ngd, steps=0))
    one = optimise(smollm2, requests, dataclasses.replace(ngd, steps=1))
    torch.testing.assert_close(one.delta_ratio, torch.full_like(one.delta_ratio, 0.05))
    assert (one.nll < start.nll).all(), (one.nll, start.nll)
    adam = optimise(smollm2, requests, dataclasses.replace(MARGIN, steps=25))
    run = optimise(smollm2, requests, dataclasses.replace(ngd, steps=25))
    assert (run.converged == 1).all() and (run.margin >= 2.0).all()
    assert run.delta.norm() < adam.delta.norm(), (run.delta_ratio, adam.delta_ratio)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="values.optimizer"):
        values.ValueArgs(optimizer="lbfgs")


@pytest.mark.parametrize("optimizer", ["adam", "ngd"])
def test_deltas_kept_orthogonal_to_the_avoided_direction(smollm2, optimizer):
    """`avoid` (`values.avoid_written`): with the edits' own shared direction (their mean
    unit delta) avoided, every delta is orthogonal to it, the edits still meet the margin,
    and an ngd step keeps its full set length inside the allowed space."""
    torch.manual_seed(0)
    requests = load_requests(EDIT_DATA, limit=4)
    args = dataclasses.replace(MARGIN, steps=25, optimizer=optimizer)
    free = optimise(smollm2, requests, args)
    shared = torch.nn.functional.normalize(free.delta, dim=1).mean(0)
    avoid = (shared / shared.norm())[None]                                   # [1, d]
    assert (free.delta @ avoid.T).abs().max() > 0.1 * free.delta.norm(dim=1).min()
    kept = optimise(smollm2, requests, args, avoid=avoid)
    assert (kept.delta @ avoid.T).abs().max() < 1e-4 * kept.delta.norm(dim=1).min()
    assert (kept.converged == 1).all() and (kept.margin >= 2.0).all()
    if optimizer == "ngd":
        one = optimise(smollm2, requests, dataclasses.replace(args, steps=1), avoid=avoid)
        torch.testing.assert_close(one.delta_ratio, torch.full_like(one.delta_ratio, 0.10))


def test_written_directions_are_the_changes_top_output_directions():
    gen = torch.Generator().manual_seed(0)
    change = torch.randn(12, 5, generator=gen, dtype=torch.float64)        # ΔW [d_k, d_v]
    top = values.written_directions(change, 2)
    torch.testing.assert_close(top @ top.T, torch.eye(2, dtype=torch.float64))
    assert values.written_directions(change, 0) is None
    assert values.written_directions(torch.zeros(12, 5), 1) is None
    # ΔW's energy along the first direction is its largest singular value squared
    torch.testing.assert_close((change @ top[0]).norm(), torch.linalg.svdvals(change)[0])
    with pytest.raises(ValueError, match="values.avoid_written"):
        values.ValueArgs(avoid_written=-1)
