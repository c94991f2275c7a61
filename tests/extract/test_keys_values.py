import pytest
import torch

from tasks.anchor import anchor_stats, read_corpus
from tasks.data import parse_record
from tasks.edit_step import apply_edit_batch
from tasks.editors.rls import RLSArgs, RLSEditor
from tasks.evaluate.metrics import continuation_scores, score_requests
from tasks.extract.keys import compute_keys
from tasks.extract.prompts import kl_batch, make_context_templates, rewrite_batch
from tasks.extract.tokens import build_batch
from tasks.extract.values import LayerReplay, ValueArgs, compute_target_values
from tests.conftest import CORPUS

TEMPLATES = ["{}", "News of the day. {}", "I think. {}"]


def request(subject="Zorbia", prompt="Capital of Zorbia", target="Q", truth="Paris"):
    return parse_record({"prompt": prompt, "subject": subject, "target_new": target,
                         "ground_truth": truth, "rephrase_prompt": f"The capital city of {subject}",
                         "locality_prompt": "Capital of France", "locality_ground_truth": truth})


def test_batch_marks_subject_and_target_tokens(tiny):
    batch = build_batch(tiny.tokenizer, ["Capital of Zorbia Q"], [len("Capital of Zorbia")],
                        [len("Capital of Zorbia")])
    ids = batch.input_ids[0]
    assert tiny.tokenizer.decode(ids[: batch.lookup[0] + 1]) == "Capital of Zorbia"
    rows, pos = batch.target_positions
    assert tiny.tokenizer.decode(batch.labels[rows, pos]) == " Q"
    assert batch.last[0] == len(ids) - 1 == len("Capital of Zorbia Q") - 2


def test_keys_and_values_have_documented_shapes(tiny):
    reqs = [request(), request("Mount Kelo", "Mount Kelo is in", "Peru", "Chile")]
    rewrite, groups = rewrite_batch(tiny.tokenizer, reqs, TEMPLATES)
    assert rewrite.input_ids.shape[0] == len(reqs) * len(TEMPLATES)
    keys, key_edits = compute_keys(tiny, 1, rewrite, groups, len(reqs))
    assert keys.shape == (2, tiny.mlp_out(1).in_features) and key_edits.tolist() == [0, 1]
    target = compute_target_values(tiny, 1, rewrite, groups, kl_batch(tiny.tokenizer, reqs),
                                   ValueArgs(steps=3))
    d = tiny.mlp_out(1).out_features
    assert target.delta.shape == target.stream_target.shape == target.stream_init.shape == (2, d)
    assert target.nll.shape == target.delta_ratio.shape == (2,)
    z = target.stream_target
    assert not z.requires_grad and torch.isfinite(z).all()
    # on a Llama block the projection's change is the stream's change
    torch.testing.assert_close(z - target.stream_init, target.delta)
    assert not any(p.requires_grad or p.grad is not None for p in tiny.model.parameters())


def test_layer_replay_matches_a_full_forward(tiny):
    reqs = [request(), request("Mount Kelo", "Mount Kelo is in", "Peru", "Chile")]
    rewrite, _ = rewrite_batch(tiny.tokenizer, reqs, TEMPLATES)
    replay = LayerReplay(tiny, 1, rewrite)
    rows, pos = rewrite.target_positions
    fast = replay.logits(replay.stream, rows, pos - rewrite.lookup[rows])
    full = tiny.model(input_ids=rewrite.input_ids,
                      attention_mask=rewrite.attention_mask).logits[rows, pos]
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)


def test_an_edit_makes_the_target_the_top_prediction(tiny):
    from tasks.models import load_model

    lm = load_model("tiny-llama")  # a private copy: this test edits weights
    req = request()
    stats = anchor_stats(lm, [1], read_corpus(CORPUS, 40))
    editor = RLSEditor({1: lm.edit_weight(1)}, stats, RLSArgs(lam=1e-3, mu=0.5))
    target_first = lm.tokenizer(" Q")["input_ids"][0]
    prompt = lm.tokenizer(req.prompt, return_tensors="pt")
    assert lm.model(**prompt).logits[0, -1].argmax() != target_first
    nll_before = continuation_scores(lm, [(req.prompt, req.target_new)])[0][0]
    apply_edit_batch(lm, editor, [req], TEMPLATES, (1,), ValueArgs(steps=30, lr=2.0))
    assert lm.model(**prompt).logits[0, -1].argmax() == target_first
    nll_after = continuation_scores(lm, [(req.prompt, req.target_new)])[0][0]
    assert nll_after < nll_before - 1.0
    after = score_requests(lm, [req])[0]
    assert after["efficacy"] == 1.0 and after["efficacy_token_acc"] >= 0.5
    assert editor.states[1].n_updates == 1
    torch.testing.assert_close(lm.mlp_out(1).weight.T.double(), editor.weight(1).float().double())


def test_length_buckets_cover_every_edit_once():
    from tasks.extract.values import length_buckets

    lengths = [3, 3, 4, 9, 10, 3, 4, 12, 3, 5]
    buckets = length_buckets(lengths, rows_per_edit=7)
    assert sorted(e for b in buckets for e in b) == list(range(10))
    assert len(buckets) > 1                      # short and long suffixes are kept apart
    assert length_buckets([4] * 6, rows_per_edit=7) == [list(range(6))]


def test_bucketed_values_equal_one_joint_optimisation(tiny):
    from tasks.extract.values import _optimise_deltas

    reqs = [request(), request("Mount Kelo", "Mount Kelo, a peak that lies in the state of",
                               "Peru", "Chile"), request("Ovo", "Ovo", "B", "C")]
    rewrite, groups = rewrite_batch(tiny.tokenizer, reqs, TEMPLATES)
    kl = kl_batch(tiny.tokenizer, reqs)
    args = ValueArgs(steps=5, lr=1.0)
    buckets = compute_target_values(tiny, 1, rewrite, groups, kl, args)
    joint = _optimise_deltas(tiny, 1, rewrite, groups, kl, args)
    torch.testing.assert_close(buckets.stream_init, joint.stream_init, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(buckets.stream_target, joint.stream_target, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(buckets.nll, joint.nll, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,overrides", [
    ("memit", {"cov_weight_ref_dk": None, "cov_weight": 1.0}),
    ("alphaedit", {"nullspace_threshold": "median"}),
    ("ft", {"norm_bound": 0.05, "lr": 1e-2}),
])
def test_every_editor_edits_only_its_layer_and_raises_the_target(name, overrides):
    from tasks.editors import build_editor
    from tasks.models import load_model

    lm = load_model("tiny-llama")  # a private copy: this test edits weights
    req = request()
    stats = anchor_stats(lm, [1], read_corpus(CORPUS, 40))
    if overrides.get("nullspace_threshold") == "median":  # half of the tiny model's spectrum
        spectrum = torch.linalg.eigvalsh(stats[1].cov / stats[1].count)
        overrides = {"nullspace_threshold": float(spectrum.median())}
    editor = build_editor(name, {1: lm.edit_weight(1)}, stats, overrides)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    nll_before = continuation_scores(lm, [(req.prompt, req.target_new)])[0][0]
    stats_out = apply_edit_batch(lm, editor, [req], TEMPLATES, (1,), ValueArgs(steps=30, lr=2.0))
    nll_after = continuation_scores(lm, [(req.prompt, req.target_new)])[0][0]
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)
    assert stats_out["update_norm_L1"] > 0
    changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    torch.testing.assert_close(lm.mlp_out(1).weight.T.double(), editor.weight(1).float().double())


def test_margin_stop_ends_each_edit_once_it_wins_by_the_margin():
    """stop_on: margin stops an edit as soon as target_new beats ground_truth by the margin
    on every prompt: sooner than the NLL stop, and the written edit shows that margin."""
    from tasks.extract.keys import KeyArgs
    from tasks.models import load_model

    lm = load_model("tiny-llama")  # a private copy: this test edits weights
    reqs = [request(), request("Mount Kelo", "Mount Kelo is in", "Peru", "Chile")]
    rewrite, groups = rewrite_batch(lm.tokenizer, reqs, TEMPLATES)
    truth, _ = rewrite_batch(lm.tokenizer, reqs, TEMPLATES, "ground_truth")
    kl = kl_batch(lm.tokenizer, reqs)
    by_nll = compute_target_values(lm, 1, rewrite, groups, kl,
                                   ValueArgs(steps=40, lr=1.0, early_stop=1e-3))
    margin_args = ValueArgs(steps=40, lr=1.0, stop_on="margin", margin=0.5)
    with pytest.raises(ValueError, match="truth"):
        compute_target_values(lm, 1, rewrite, groups, kl, margin_args)
    by_margin = compute_target_values(lm, 1, rewrite, groups, kl, margin_args, truth)
    assert (by_margin.steps < 40).all() and (by_margin.steps < by_nll.steps).all()
    assert (by_margin.margin >= 0.5).all() and by_nll.margin.isnan().all()
    assert (by_margin.delta.norm(dim=1) < by_nll.delta.norm(dim=1)).all()
    # written exactly (one key row per prompt, a near-free solve), the margin is in the model
    editor = RLSEditor({1: lm.edit_weight(1)}, anchor_stats(lm, [1], read_corpus(CORPUS, 20)),
                       RLSArgs(lam=1e-6, mu=0.0))
    stats = apply_edit_batch(lm, editor, reqs, TEMPLATES, (1,), margin_args, KeyArgs(mode="rows"))
    assert all(r["value_margin"] >= 0.5 for r in stats["edits"])
    nll, _ = continuation_scores(lm, [(r.prompt, t) for r in reqs
                                      for t in (r.target_new, r.ground_truth)])
    assert ((nll[1::2] - nll[0::2]) > 0.5 - 1e-2).all(), nll


@pytest.mark.parametrize("lam,mu,low,high", [(1e-6, 0.0, 0.99, 1.0), (1.0, 130.0, 0.0, 0.99)])
def test_rls_writes_a_share_of_the_asked_change_set_by_its_regularisers(lam, mu, low, high):
    """‖K ΔW‖/‖V − K W‖ at the batch's own keys: all of it when nothing holds W back
    (λ → 0, no anchor), less with the pull to W0 and the anchor."""
    from tasks.editors import build_editor
    from tasks.models import load_model

    lm = load_model("tiny-llama")  # a private copy: this test edits weights
    stats = anchor_stats(lm, [1], read_corpus(CORPUS, 40))
    editor = build_editor("rlsedit", {1: lm.edit_weight(1)}, stats, {"lam": lam, "mu": mu})
    out = apply_edit_batch(lm, editor, [request()], TEMPLATES, (1,), ValueArgs(steps=5))
    assert low < out["written_share_L1"] < high


def test_edits_that_did_not_land_are_written_again():
    """`values.rewrite_below`: with a strong anchor one write leaves the edits short of the
    margin asked; their rows submitted again (weight 2) take them further. Off (None), the
    step is what it was. `rewrite_on: prompts` reads the margin as the least over the
    value optimisation's prompts, which is never above the bare prompt's."""
    from tasks.edit_step import least_margins
    from tasks.models import load_model

    reqs = [request(), request("Mount Kelo", "Mount Kelo is in", "Peru", "Chile")]
    args = ValueArgs(steps=20, lr=2.0, stop_on="margin", margin=3.0)
    margins, outs = {}, {}
    for rewrite_below, rewrite_on in ((None, "bare"), (100.0, "bare"), (100.0, "prompts")):
        lm = load_model("tiny-llama")  # a private copy: this test edits weights
        editor = RLSEditor({1: lm.edit_weight(1)}, anchor_stats(lm, [1], read_corpus(CORPUS, 20)),
                           RLSArgs(lam=1.0, mu=2000.0))   # writes under 0.05 of it
        outs[rewrite_below, rewrite_on] = apply_edit_batch(
            lm, editor, reqs, TEMPLATES, (1,),
            ValueArgs(**{**vars(args), "rewrite_below": rewrite_below, "rewrite_on": rewrite_on}))
        margins[rewrite_below, rewrite_on] = least_margins(lm, reqs, ["{}"])
        assert editor.states[1].n_updates == (1 if rewrite_below is None else 2)
        if rewrite_below is None:
            on_prompts = least_margins(lm, reqs, TEMPLATES)
            each = torch.stack([least_margins(lm, reqs, [t]) for t in TEMPLATES], dim=1)
            assert torch.allclose(on_prompts, each.min(dim=1).values, atol=1e-5)
            assert (on_prompts <= margins[None, "bare"] + 1e-5).all()
    once, twice = outs[None, "bare"], outs[100.0, "bare"]
    assert "rewritten" not in once and twice["rewritten"] == len(reqs)
    assert twice["bare_margin_mean"] == pytest.approx(float(margins[None, "bare"].mean()), abs=1e-4)
    assert outs[100.0, "prompts"]["prompt_margin_mean"] == pytest.approx(
        float(on_prompts.mean()), abs=1e-4)
    assert (margins[100.0, "bare"] > margins[None, "bare"]).all(), margins


def test_open_prefixes_run_on_into_the_prompt_from_the_same_sampled_words(tiny):
    """`open_prefixes` changes only how the last prefixes join the prompt (" " for ". "):
    the sampled words, and so every other template, stay as they were."""
    closed = make_context_templates(tiny, 3, 4, seed=0)
    opened = make_context_templates(tiny, 3, 4, seed=0, open_prefixes=2)
    assert opened[:2] == closed[:2] and closed[1].endswith(". {}")
    assert [t.removesuffix(" {}") for t in opened[2:]] == [t.removesuffix(". {}")
                                                           for t in closed[2:]]
    with pytest.raises(ValueError, match="open_prefixes"):
        ValueArgs(n_prefixes=2, open_prefixes=3)
