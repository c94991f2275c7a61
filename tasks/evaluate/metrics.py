"""CounterFact metrics (ROME/MEMIT definitions) and fluency.

Per request, with P(x) the mean per-token probability of continuation x (compared via
mean negative log-likelihood, as ROME does):
- efficacy:        edit prompt,     P(target_new) > P(ground_truth)
- generalization:  rephrase prompts, same test (mean over prompts)
- specificity:     locality prompts, P(locality_ground_truth) > P(target_new)
- specificity_nbhd: neighbourhood prompts (other subjects, same relation and true
                   object: `tasks/evaluate/neighbours.py`), P(ground_truth) > P(target_new)
and EasyEdit's token-level accuracies (teacher-forced argmax == token) for the same three.
Fluency: n-gram entropy of greedy generations from the edit prompts (ROME's weights).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
import torch.nn.functional as F

from tasks.data import EditRequest
from tasks.extract.tokens import TokenBatch, build_batch
from tasks.models import vocab_logits

METRIC_NAMES = ("efficacy", "generalization", "specificity", "specificity_nbhd",
                "efficacy_token_acc", "generalization_token_acc", "specificity_token_acc")


def _target_scores(model, hidden: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL and token accuracy [R] (CPU) of the teacher-forced targets `labels` [R, T]
    (-100 where nothing is scored), from final hidden states [R, T, d]. Logits are
    computed only at the scored positions."""
    rows, pos = torch.nonzero(labels != -100, as_tuple=True)
    logp = F.log_softmax(vocab_logits(model, hidden[rows, pos]).float(), -1)
    target = labels[rows, pos]
    token_nll = -logp.gather(1, target[:, None]).squeeze(1)
    hit = (logp.argmax(-1) == target).float()
    n = torch.bincount(rows, minlength=len(labels)).float()
    zeros = torch.zeros(len(labels), device=hidden.device)
    return ((zeros.index_add(0, rows, token_nll) / n).cpu(),
            (zeros.index_add(0, rows, hit) / n).cpu())


def _shared_prefix(input_ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """How many leading tokens all rows of `input_ids` [k, T] share, at most the shortest
    row's length (`lengths` [k]; pads past it may agree)."""
    same = (input_ids == input_ids[:1]).all(0).long().cumprod(0)
    return min(int(same.sum()), int(lengths.min()))


def equal_key_groups(keys: list) -> list[list[int]]:
    """Indices of `keys` grouped by equal (hashable) key, in order of first appearance."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _prompt_groups(pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Indices of (prompt, target) `pairs` grouped by prompt, in order of first appearance."""
    return equal_key_groups([prompt for prompt, _ in pairs])


def _prefix_chunks(batch: TokenBatch, groups: list[list[int]],
                   batch_size: int) -> list[tuple[int, list[list[int]]]]:
    """`groups` (rows of `batch` that share a prompt) bucketed by the length L of their
    shared token prefix, in chunks of at most `batch_size` groups: [(L, groups)]. A lone
    row, or a group that shares at most one token, gains nothing from sharing: its rows go
    alone into the L = 0 bucket, where rows of similar length meet in plain forwards."""
    lengths = batch.last + 1
    buckets: dict[int, list[list[int]]] = {}
    for group in groups:
        key = _shared_prefix(batch.input_ids[group], lengths[group]) if len(group) > 1 else 0
        if key <= 1:
            buckets.setdefault(0, []).extend([row] for row in group)
        else:
            buckets.setdefault(key, []).append(group)
    chunks = []
    for length, members in sorted(buckets.items()):
        members.sort(key=lambda group: int(lengths[group].max()))  # similar suffix lengths
        chunks += [(length, members[i:i + batch_size])
                   for i in range(0, len(members), batch_size)]
    return chunks


def _hidden_with_shared_prefix(model, input_ids: torch.Tensor, owner: torch.Tensor,
                               length: int) -> torch.Tensor:
    """Final hidden states [R, T, d] of right-padded rows `input_ids` [R, T], grouped in
    consecutive runs (`owner` [R]: each row's group, 0..G-1) whose rows share their first
    `length` tokens. Each group's prefix runs once; its keys/values enter the group's
    rows as a cache for the rest. No attention mask is needed: a row is padded only at its
    end, after its last real token, and a causal model's real tokens never see later ones.
    """
    from transformers import DynamicCache

    base = model.base_model
    if length == 0:
        return base(input_ids=input_ids, use_cache=False).last_hidden_state
    first = torch.searchsorted(owner, torch.arange(int(owner[-1]) + 1, device=owner.device))
    cache = DynamicCache(config=model.config)
    prefix = base(input_ids=input_ids[first, :length], past_key_values=cache,
                  use_cache=True).last_hidden_state[owner]            # [R, length, d]
    if input_ids.shape[1] == length:
        return prefix
    cache.batch_select_indices(owner)
    suffix = base(input_ids=input_ids[:, length:], past_key_values=cache,
                  use_cache=True).last_hidden_state                     # [R, T - length, d]
    return torch.cat([prefix, suffix], 1)


@torch.no_grad()
def continuation_scores(lm, pairs: list[tuple[str, str]],
                        batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """For (prompt, target) pairs: mean NLL of " target" after prompt, and token accuracy.

    Returns two [N] float tensors. Each text "prompt target" is tokenised whole
    (`build_batch`); the pairs of one prompt share the longest common prefix of their
    tokens, which runs once (`batch_size` prompts per forward, prefixes of one length).
    Logits are computed only at target positions.
    """
    if not pairs:
        return torch.empty(0), torch.empty(0)
    batch = build_batch(lm.tokenizer, [p + " " + t for p, t in pairs],
                        target_starts=[len(p) for p, _ in pairs])
    return grouped_target_scores(lm.model, batch, _prompt_groups(pairs), batch_size)


def grouped_target_scores(model, batch: TokenBatch, groups: list[list[int]],
                          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL and token accuracy [N] of the labelled tokens of the N right-padded rows of
    `batch`, where the rows of each group (indices into `batch`) usually share a token
    prefix: it runs once per group, `batch_size` groups per forward. Exact whatever the
    grouping; the grouping only decides what is shared."""
    nll, acc = torch.empty(len(batch.input_ids)), torch.empty(len(batch.input_ids))
    for length, chunk in _prefix_chunks(batch, groups, batch_size):
        rows = torch.tensor([i for group in chunk for i in group])
        owner = torch.repeat_interleave(torch.arange(len(chunk)),
                                        torch.tensor([len(group) for group in chunk]))
        sub = batch.select(rows).to(model.device)
        hidden = _hidden_with_shared_prefix(model, sub.input_ids, owner.to(model.device), length)
        nll[rows], acc[rows] = _target_scores(model, hidden, sub.labels)
    return nll, acc


def score_requests(lm, requests: list[EditRequest], batch_size: int = 32) -> list[dict]:
    """Per-request metrics (see module docstring) as a list of dicts of floats."""
    pairs: dict[tuple[str, str], int] = {}

    def slot(prompt, target):
        return pairs.setdefault((prompt, target), len(pairs))

    plan = []
    for req in requests:
        plan.append((
            (slot(req.prompt, req.target_new), slot(req.prompt, req.ground_truth)),
            [(slot(p, req.target_new), slot(p, req.ground_truth)) for p in req.rephrase_prompts],
            [(slot(p, req.locality_ground_truth), slot(p, req.target_new))
             for p in req.locality_prompts],
            [(slot(p, req.ground_truth), slot(p, req.target_new)) for p in req.neighbour_prompts],
        ))
    nll, acc = continuation_scores(lm, list(pairs), batch_size)

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    scores = []
    for (edit_new, edit_true), rephrase, locality, neighbours in plan:
        scores.append({
            "efficacy": float(nll[edit_new] < nll[edit_true]),
            "generalization": mean([float(nll[a] < nll[b]) for a, b in rephrase]),
            "specificity": mean([float(nll[a] < nll[b]) for a, b in locality]),
            "specificity_nbhd": mean([float(nll[a] < nll[b]) for a, b in neighbours]),
            "efficacy_token_acc": float(acc[edit_new]),
            "generalization_token_acc": mean([float(acc[a]) for a, _ in rephrase]),
            "specificity_token_acc": mean([float(acc[a]) for a, _ in locality]),
        })
    return scores


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean of `values` and its standard error over them, std/√n (for 0/1 scores that
    is √(p(1−p)/n)); NaN for no values."""
    if not values:
        return float("nan"), float("nan")
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n / n)


def aggregate(scores: list[dict], prefix: str = "") -> dict[str, float]:
    """Mean of each metric over requests (NaNs, e.g. no rephrase prompt, skipped) as
    `<prefix><metric>`, its standard error over requests as `<prefix><metric>_se`, and
    `<prefix>specificity_nbhd_edits`: how many requests had a neighbour to score."""
    out = {}
    for name in METRIC_NAMES:
        values = [s[name] for s in scores if not math.isnan(s[name])]
        out[prefix + name], out[prefix + name + "_se"] = mean_and_se(values)
        if name == "specificity_nbhd":
            out[prefix + name + "_edits"] = len(values)
    return out


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency: weighted mean of the n-gram entropies (bits) of a text's words."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    parts = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(weight * entropy)
    return sum(parts) / len(parts)


@torch.no_grad()
def fluency(lm, prompts: list[str], max_new_tokens: int = 50, batch_size: int = 16) -> float:
    """Mean n-gram entropy of greedy generations from `prompts`."""
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    entropies = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tok(prompts[start:start + batch_size], return_tensors="pt",
                      padding=True).to(lm.model.device)
            out = lm.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tok.pad_token_id)
            for row, prompt in zip(out, prompts[start:start + batch_size]):
                text = prompt + tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
                entropies.append(ngram_entropy(text))
    finally:
        tok.padding_side = side
    return sum(entropies) / len(entropies) if entropies else float("nan")
