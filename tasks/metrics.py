"""CounterFact metrics (ROME/MEMIT definitions) and fluency.

Per request, with P(x) the mean per-token probability of continuation x (compared via
mean negative log-likelihood, as ROME does):
- efficacy:        edit prompt,     P(target_new) > P(ground_truth)
- generalization:  rephrase prompts, same test (mean over prompts)
- specificity:     locality prompts, P(locality_ground_truth) > P(target_new)
- specificity_nbhd: neighbourhood prompts (other subjects, same relation and true
                   object: `tasks/neighbours.py`), P(ground_truth) > P(target_new)
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
from tasks.extract.tokens import build_batch
from tasks.models import vocab_logits

METRIC_NAMES = ("efficacy", "generalization", "specificity", "specificity_nbhd",
                "efficacy_token_acc", "generalization_token_acc", "specificity_token_acc")


@torch.no_grad()
def continuation_scores(lm, pairs: list[tuple[str, str]],
                        batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """For (prompt, target) pairs: mean NLL of " target" after prompt, and token accuracy.

    Returns two [N] float tensors. Logits are computed only at target positions.
    """
    nll = torch.empty(len(pairs))
    acc = torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    base = lm.model.base_model
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        texts = [pairs[i][0] + " " + pairs[i][1] for i in idx]
        batch = build_batch(lm.tokenizer, texts, target_starts=[len(pairs[i][0]) for i in idx])
        batch = batch.to(lm.model.device)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      use_cache=False).last_hidden_state
        rows, pos = batch.target_positions
        logp = F.log_softmax(vocab_logits(lm.model, hidden[rows, pos]).float(), -1)
        labels = batch.labels[rows, pos]
        token_nll = -logp.gather(1, labels[:, None]).squeeze(1)
        hit = (logp.argmax(-1) == labels).float()
        n = torch.bincount(rows, minlength=len(idx)).float()
        row_nll = torch.zeros(len(idx)).index_add_(0, rows.cpu(), token_nll.cpu()) / n.cpu()
        row_acc = torch.zeros(len(idx)).index_add_(0, rows.cpu(), hit.cpu()) / n.cpu()
        nll[idx] = row_nll
        acc[idx] = row_acc
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


@torch.no_grad()
def perplexity(lm, texts: list[str], max_tokens: int = 128, batch_size: int = 16) -> float:
    """exp of the mean next-token NLL over all tokens of `texts` (each cut at `max_tokens`)."""
    tok = lm.tokenizer
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                  truncation=True, max_length=max_tokens).to(lm.model.device)
        logits = lm.model(**enc, use_cache=False).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
        total_nll += float(nll)
        total_tokens += int(mask.sum())
    return math.exp(total_nll / max(total_tokens, 1))
