"""The capability suite's shared-context likelihoods equal lm-eval's HFLM on the same model:
multiple-choice requests, continuations that are one another's start, inputs cut from the
left at `max_length`, rolling windows (no strings), and batches split every way."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from tasks.evaluate.shared_context import SharedContextHFLM, context_groups
from tasks.models import load_model

TEXTS = ["Wall St. Bears Claw Back Into the Black (Reuters) Short-sellers, Wall Street's "
         "dwindling band of ultra-cynics, are seeing green again.",
         "Oil prices soar to all-time record, posing new menace to US economy.",
         "Q r"]
CHOICES = [" World", " Sports", " Business", " Sci/Tech", " Sci"]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def lm(request):
    return load_model(request.param)


def requests(tokenizer):
    """Every text with every choice, HFLM-style token lists, and one rolling window."""
    out = []
    for text in TEXTS:
        context = tokenizer.encode(text + "\nTopic:", add_special_tokens=False)
        for choice in CHOICES:
            out.append(((text, choice), context,
                        tokenizer.encode(choice, add_special_tokens=False)))
    eos = tokenizer.eos_token_id
    out.append((None, [eos], tokenizer.encode("Oil prices soar", add_special_tokens=False)))
    return out


@pytest.mark.parametrize("max_length,batch_size", [(2048, 8), (24, 2), (2048, 1)])
def test_loglikelihoods_equal_hflm(lm, max_length, batch_size):
    reqs = requests(lm.tokenizer)
    assert any(len(c) + len(x) > max_length for _, c, x in reqs) == (max_length == 24)
    args = dict(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size,
                max_length=max_length)
    plain = HFLM(**args)._loglikelihood_tokens(reqs, disable_tqdm=True)
    shared = SharedContextHFLM(**args)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(shared) == len(plain) == len(reqs)
    for (p_logp, p_greedy), (s_logp, s_greedy) in zip(plain, shared):
        assert s_logp == pytest.approx(p_logp, rel=1e-5, abs=1e-4)
        assert s_greedy == p_greedy
    assert all(logp < 0 for logp, _ in shared)


def test_choices_of_one_context_are_grouped(lm):
    reqs = requests(lm.tokenizer)
    groups = context_groups(reqs)
    assert [len(g) for g in groups] == [len(CHOICES)] * len(TEXTS) + [1]
    assert sorted(i for g in groups for i in g) == list(range(len(reqs)))


def test_fewer_token_positions_run_than_in_hflm(lm):
    """Counted at the model's input: the shared path runs each context once."""
    reqs = requests(lm.tokenizer)[:-1]
    seen = []
    hook = lm.model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        for cls in (HFLM, SharedContextHFLM):
            seen.clear()
            cls(pretrained=lm.model, tokenizer=lm.tokenizer,
                batch_size=8)._loglikelihood_tokens(reqs, disable_tqdm=True)
            positions = sum(seen)
            if cls is HFLM:
                plain_positions = positions
    finally:
        hook.remove()
    assert positions < plain_positions / 2
    assert torch.is_grad_enabled()
