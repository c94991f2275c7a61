"""The shared-prefix scoring and the length-sorted perplexity give what the plain
algorithms gave (`bench/eval_speed.py` keeps those as references)."""

import pytest
import torch

from bench.eval_speed import (reference_continuation_scores, reference_perplexity,
                              same_scores, score_with)
from tasks.data import load_requests, parse_record
from tasks.anchor import read_corpus
from tasks.corpus import HeldoutArgs
from tasks.evaluate.capability import heldout_perplexity, heldout_suite
from tasks.evaluate.metrics import _hidden_with_shared_prefix, continuation_scores
from tasks.evaluate.neighbours import NeighbourArgs, with_neighbours
from tasks.models import load_model
from tests.conftest import CORPUS, EDIT_DATA


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def lm(request):
    return load_model(request.param)


def awkward_requests():
    """Targets where one is the other's start ("New" / "New York": the shorter text lies
    wholly in the shared prefix), a prompt shared by two requests (four continuations), a
    locality answer equal to the new target (one continuation), one-character texts."""
    def make(prompt, new, true, locality="Paris is in", local_truth="France"):
        return parse_record({"prompt": prompt, "subject": prompt.split()[0],
                             "target_new": new, "ground_truth": true,
                             "rephrase_prompt": f"In short, {prompt}",
                             "locality_prompt": locality, "locality_ground_truth": local_truth})
    return [make("Zorbia is located in", "New", "New York"),
            make("Zorbia is located in", "Peru", "Chile"),
            make("Kelo plays the", "violin", "piano", local_truth="violin"),
            make("Q r", "x", "yz", locality="a", local_truth="b")]


@pytest.mark.parametrize("batch_size", [32, 3])
def test_shared_prefix_scores_equal_the_full_forward(lm, batch_size):
    """Real CounterFact requests with neighbours, and awkward ones, in one batch and in
    many small ones (prefix buckets split, rows of several lengths padded together)."""
    requests = with_neighbours(load_requests(EDIT_DATA, limit=5), NeighbourArgs(
        pool=str(EDIT_DATA), per_edit=2), seed=0) + awkward_requests()
    old, old_nll, old_acc, _ = score_with(reference_continuation_scores, lm, requests, batch_size)
    new, new_nll, new_acc, _ = score_with(continuation_scores, lm, requests, batch_size)
    assert len(new_nll) > 50
    assert same_scores(old, new)
    assert torch.equal(old_acc, new_acc)
    torch.testing.assert_close(new_nll, old_nll, rtol=0, atol=1e-5)


def test_scores_do_not_depend_on_what_else_is_scored(lm):
    pairs = [("Zorbia is located in", "New York"), ("Zorbia is located in", "Peru")]
    alone = continuation_scores(lm, pairs[:1])
    together = continuation_scores(lm, pairs)
    torch.testing.assert_close(together[0][:1], alone[0], rtol=0, atol=1e-5)
    assert torch.equal(together[1][:1], alone[1])
    assert [len(t) for t in continuation_scores(lm, [])] == [0, 0]


@pytest.mark.parametrize("length", [0, 5, 9])
def test_hidden_states_with_a_cached_prefix_equal_a_plain_forward(lm, length):
    """Rows [3, 9] in two groups sharing `length` tokens, right-padded: real positions
    match one forward of the whole rows (0: no prefix run; 9: no suffix run)."""
    torch.manual_seed(0)
    shared = torch.randint(0, 250, (2, length))
    ids = torch.cat([shared[[0, 0, 1]], torch.randint(0, 250, (3, 9 - length))], 1)
    mask = torch.ones_like(ids)
    if length < 9:
        ids[2, -1], mask[2, -1] = lm.tokenizer.pad_token_id, 0
    owner = torch.tensor([0, 0, 1])
    fast = _hidden_with_shared_prefix(lm.model, ids, owner, length)
    full = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(fast[real], full[real], rtol=1e-5, atol=1e-5)


def test_lmeval_perplexity_equals_the_padded_full_logits_one(lm, tmp_path):
    """lm-eval's held-out task through `SharedContextHFLM` gives the plain per-token
    perplexity, a one-byte text (nothing to score) and texts longer than the cut included."""
    heldout = tmp_path / "heldout.tsv"
    heldout.write_text("".join(line.split("\t")[0] + "\t0\n"
                               for line in CORPUS.read_text().splitlines()[:13])
                       + "a\t0\nShort one.\t0\n")
    texts = read_corpus(heldout)
    for max_tokens, batch_size in [(64, 4), (500, 16)]:
        old = reference_perplexity(lm, texts, max_tokens, batch_size)
        args = HeldoutArgs(corpus=str(heldout), offset=0, n_texts=len(texts),
                           max_tokens=max_tokens)
        new = heldout_perplexity(heldout_suite(lm, args, batch_size))
        assert new == pytest.approx(old, rel=1e-5)
