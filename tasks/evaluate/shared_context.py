"""lm-eval's HFLM with the likelihood requests of one context sharing its forward pass.

A multiple-choice document asks for log P(choice | context) once per choice (AG News: four
choices after a ~50-token article), and HFLM runs the context again for each, with the
vocabulary projection and log-softmax at every position. Here the requests go through the
CounterFact scorer's path (`tasks.evaluate.metrics.grouped_target_scores`): the choices of
one context share their common token prefix, which runs once, and logits are computed at
continuation positions only. Inputs are HFLM's own (its tokenisation, its left truncation
to `max_length`), so the scores are HFLM's up to float rounding
(tests/evaluate/test_shared_context.py). Generation requests are HFLM's, unchanged.
"""

from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM

from tasks.evaluate.metrics import equal_key_groups, grouped_target_scores
from tasks.extract.tokens import TokenBatch, pad_right

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context, continuation)


def request_batch(requests: list[Request], max_length: int) -> TokenBatch:
    """The rows HFLM would run: (context + continuation), cut from the left to
    `max_length` + 1 tokens, last token dropped; labels at the continuation's positions."""
    rows, labels = [], []
    for _, context, continuation in requests:
        tokens = (context + continuation)[-(max_length + 1):]
        n_scored = len(continuation)
        rows.append(tokens[:-1])
        labels.append([-100] * (len(tokens) - 1 - n_scored) + tokens[-n_scored:])
    input_ids, attention = pad_right(rows, 0)   # pads sit after each row's last real token
    return TokenBatch(input_ids=input_ids, attention_mask=attention,
                      lookup=torch.full((len(rows),), -1),
                      labels=pad_right(labels, -100, width=input_ids.shape[1])[0],
                      last=attention.sum(1) - 1)


def context_groups(requests: list[Request]) -> list[list[int]]:
    """Indices of `requests` grouped by their context tokens, in order of first appearance."""
    return equal_key_groups([tuple(context) for _, context, _ in requests])


class SharedContextHFLM(HFLM):
    """HFLM whose loglikelihood requests share each context's forward pass (causal models;
    others fall back to HFLM's own loop). `batch_size` counts contexts per forward."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        with torch.no_grad():
            nll, acc = grouped_target_scores(self.model, request_batch(requests, self.max_length),
                                             context_groups(requests), batch_size)
        answers = []
        for (strings, _, continuation), mean_nll, hits in zip(requests, nll.tolist(), acc.tolist()):
            answer = (-mean_nll * len(continuation), hits == 1.0)   # (log P, greedy?)
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
            answers.append(answer)
        return answers
