"""Seconds per part of one evaluation point, the previous algorithms against today's.

    python -m bench.eval_speed --num-requests 200 --threads 1 --repeats 2 --append

An evaluator's point (`tasks/remote/actors.py`, `Evaluator.evaluate`) is CounterFact scoring of
the stream's requests (`score_requests`), held-out perplexity and, when a grid asks, the
lm-eval capability suite; fluency runs once per stream, after its last edit. This times,
on one model's unedited weights in one process, each part as it was before issue 15
(`reference_continuation_scores`: every (prompt, target) text a full forward, batched by
length; `reference_perplexity`: texts in given order, logits at every padded position)
and as it is now (`tasks/evaluate/metrics.py`; perplexity: lm-eval's `rlsedit_agnews_ppl`
through `SharedContextHFLM`), old and new alternating, and checks that the
scores agree: per-request metrics and token accuracies exactly, NLLs and perplexity to
1e-5, absolute and relative (the reference itself moves NLLs of ~20 nats by 2.5e-5
between batch sizes 32 and 7). Requests are the first `--num-requests` of `--data` with
up to 10 neighbourhood prompts each (`with_neighbours`, the stream's default pool);
held-out texts as `HeldoutArgs`. With `--capability PROFILE` the lm-eval suite is timed too:
lm-eval's own HFLM against `SharedContextHFLM` (each context's choices share one forward),
scores checked equal to 1e-5 relative.

The references live here (`tests/evaluate/test_metrics_speed.py` uses them too) as the definition
that the fast paths must reproduce; they are not a production path.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from unittest import mock

import torch
import torch.nn.functional as F

from bench.docs import append_section, command_line
from tasks.extract.tokens import build_batch
from tasks.models import vocab_logits

NLL_TOLERANCE = 1e-5


@torch.no_grad()
def reference_continuation_scores(lm, pairs: list[tuple[str, str]],
                                  batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`continuation_scores` before issue 15: each "prompt target" text runs whole, in
    batches of `batch_size` texts sorted by length. Two [N] tensors: mean NLL, accuracy."""
    nll, acc = torch.empty(len(pairs)), torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = build_batch(lm.tokenizer, [pairs[i][0] + " " + pairs[i][1] for i in idx],
                            target_starts=[len(pairs[i][0]) for i in idx])
        hidden = lm.model.base_model(input_ids=batch.input_ids,
                                     attention_mask=batch.attention_mask,
                                     use_cache=False).last_hidden_state
        rows, pos = batch.target_positions
        logp = F.log_softmax(vocab_logits(lm.model, hidden[rows, pos]).float(), -1)
        labels = batch.labels[rows, pos]
        n = torch.bincount(rows, minlength=len(idx)).float()
        nll[idx] = torch.zeros(len(idx)).index_add_(
            0, rows, -logp.gather(1, labels[:, None]).squeeze(1)) / n
        acc[idx] = torch.zeros(len(idx)).index_add_(
            0, rows, (logp.argmax(-1) == labels).float()) / n
    return nll, acc


@torch.no_grad()
def reference_perplexity(lm, texts: list[str], max_tokens: int = 128,
                         batch_size: int = 16) -> float:
    """`perplexity` before issue 15: texts in the given order, full logits [B, T, vocab]."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = lm.tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_tokens)
        logits = lm.model(**enc, use_cache=False).logits[:, :-1].float()
        labels, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
        total_nll += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        total_tokens += int(mask.sum())
    return math.exp(total_nll / max(total_tokens, 1))


def score_with(scorer, lm, requests, batch_size: int = 32):
    """`score_requests` with `scorer` as its continuation scorer: (per-request scores,
    the NLLs [P] and accuracies [P] of its (prompt, target) pairs, seconds)."""
    import tasks.evaluate.metrics as metrics

    seen = {}

    def recording(*args):
        seen["nll"], seen["acc"] = scorer(*args)
        return seen["nll"], seen["acc"]

    with mock.patch.object(metrics, "continuation_scores", recording):
        tic = time.perf_counter()
        scores = metrics.score_requests(lm, requests, batch_size)
        seconds = time.perf_counter() - tic
    return scores, seen["nll"], seen["acc"], seconds


def same_scores(a: list[dict], b: list[dict]) -> bool:
    """Per-request metrics equal, NaN (nothing to score) matching NaN."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k]))
                                     for k in x) for x, y in zip(a, b))


def timed(fn, *args):
    tic = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - tic


def nll_check(old: torch.Tensor, new: torch.Tensor) -> tuple[bool, str]:
    """Whether NLLs [P] agree to NLL_TOLERANCE (absolute and relative, as the reference
    differs from itself by as much between batch sizes), and the largest differences."""
    diff = (old - new).abs()
    ok = bool((diff <= NLL_TOLERANCE * (1 + old.abs())).all())
    return ok, f"max NLL diff {diff.max():.1e} (rel. {(diff / old.abs()).max():.1e})"


def scored_pairs(requests) -> list[tuple[str, str]]:
    """The (prompt, target) pairs that `score_requests` scores for `requests`."""
    seen = []

    def capture(_lm, pairs, _batch_size):
        seen.extend(pairs)
        return torch.zeros(len(pairs)), torch.zeros(len(pairs))

    score_with(capture, None, requests)
    return seen


def forward_tokens(tokenizer, pairs: list[tuple[str, str]], batch_size: int) -> tuple[int, int]:
    """Token positions, padding included, that the reference and today's scoring put
    through the model for `pairs`."""
    from tasks.evaluate.metrics import _prefix_chunks, _prompt_groups

    batch = build_batch(tokenizer, [p + " " + t for p, t in pairs],
                        target_starts=[len(p) for p, _ in pairs])
    lengths = (batch.last + 1).tolist()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    old = sum(len(idx) * max(lengths[i] for i in idx)
              for idx in (order[s:s + batch_size] for s in range(0, len(order), batch_size)))
    new = 0
    for length, chunk in _prefix_chunks(batch, _prompt_groups(pairs), batch_size):
        rows = [i for group in chunk for i in group]
        new += len(chunk) * length + len(rows) * (max(lengths[i] for i in rows) - length)
    return old, new


def alternating(repeats: int, old, new) -> tuple:
    """Run `old()` and `new()` `repeats` times, alternating which goes first (the machine
    may be shared): their first outputs and the seconds of every run of each."""
    runs = {old: [], new: []}
    for r in range(repeats):
        for fn in ((old, new) if r % 2 == 0 else (new, old)):
            runs[fn].append(timed(fn))
    return (runs[old][0][0], [s for _, s in runs[old]],
            runs[new][0][0], [s for _, s in runs[new]])


def capability_suites(lm, profile: str):
    """The suite `profile` on `lm` twice: through lm-eval's own HFLM (before) and through
    today's `SharedContextHFLM` (now)."""
    from lm_eval.models.huggingface import HFLM

    from tasks.evaluate.capability import CapabilityArgs, CapabilitySuite

    plain, shared = (CapabilitySuite(lm, CapabilityArgs(profile=profile)) for _ in range(2))
    length = {"max_length": plain.args.max_length} if plain.args.max_length else {}
    plain.hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer,
                      batch_size=plain.args.batch_size, **length)
    return plain, shared


def suite_check(old: dict[str, float], new: dict[str, float]) -> tuple[bool, str]:
    """Whether two suite results agree: the same metrics, to NLL_TOLERANCE relative."""
    worst = max((abs(old[k] - new[k]) / max(abs(old[k]), 1e-12) for k in old), default=0.0)
    ok = old.keys() == new.keys() and worst <= NLL_TOLERANCE
    return ok, (f"{len(old)} scores {'equal' if ok else 'DIFFER'}, "
                f"max rel. diff {worst:.1e}")


def measure(opts) -> tuple[list[list[str]], list[str]]:
    """Table rows [part, old s, new s, ratio, every run's s, check] and notes."""
    from tasks.anchor import read_corpus
    from tasks.corpus import HeldoutArgs
    from tasks.data import load_requests
    from tasks.evaluate.capability import heldout_perplexity, heldout_suite
    from tasks.evaluate.metrics import continuation_scores
    from tasks.evaluate.neighbours import NeighbourArgs, with_neighbours
    from tasks.models import load_model

    lm = load_model(opts.model)
    requests = with_neighbours(load_requests(opts.data, limit=opts.num_requests),
                               NeighbourArgs(), seed=0)
    heldout = HeldoutArgs(n_texts=opts.heldout_texts, max_tokens=opts.heldout_tokens)
    texts = read_corpus(heldout.corpus, heldout.n_texts, offset=heldout.offset)
    old, old_s, new, new_s = alternating(
        opts.repeats, lambda: score_with(reference_continuation_scores, lm, requests,
                                         opts.batch_size)[:3],
        lambda: score_with(continuation_scores, lm, requests, opts.batch_size)[:3])
    nll_ok, nll_note = nll_check(old[1], new[1])
    scores_ok = same_scores(old[0], new[0]) and torch.equal(old[2], new[2])
    suite = heldout_suite(lm, heldout)
    suite.task_specs   # the task's documents are prepared once per suite, before timing
    old_ppl, old_ppl_s, new_ppl, new_ppl_s = alternating(
        opts.repeats, lambda: reference_perplexity(lm, texts, heldout.max_tokens),
        lambda: heldout_perplexity(suite))
    ppl_diff = abs(old_ppl - new_ppl) / old_ppl
    rows = [["CounterFact scoring", old_s, new_s,
             f"metrics {'equal' if scores_ok else 'DIFFER'}, {nll_note}"],
            ["held-out perplexity", old_ppl_s, new_ppl_s,
             f"{old_ppl:.4f} vs {new_ppl:.4f} (rel. diff {ppl_diff:.1e})"]]
    suite_ok = True
    if opts.capability:
        plain, shared = capability_suites(lm, opts.capability)
        old_cap, old_cap_s, new_cap, new_cap_s = alternating(opts.repeats, plain.score,
                                                             shared.score)
        suite_ok, suite_note = suite_check(old_cap, new_cap)
        rows.append([f"capability suite `{opts.capability}`", old_cap_s, new_cap_s, suite_note])
    rows.append(["evaluation point", [sum(min(r[1]) for r in rows)],
                 [sum(min(r[2]) for r in rows)], ""])
    table = [[part, f"{min(a):.1f}", f"{min(b):.1f}", f"{min(a) / min(b):.2f}",
              " / ".join(f"{x:.1f}" for x in a) + " → " + " / ".join(f"{x:.1f}" for x in b),
              check] for part, a, b, check in rows]
    tokens = forward_tokens(lm.tokenizer, scored_pairs(requests), opts.batch_size)
    notes = [f"{len(requests)} requests, {len(old[1])} (prompt, target) pairs, "
             f"{tokens[0]} → {tokens[1]} token positions through the model",
             f"{len(texts)} held-out texts cut at {heldout.max_tokens} tokens",
             f"before/now: least seconds of {opts.repeats} run(s) each, old and new "
             f"alternating; every run's seconds beside them"]
    if not (scores_ok and nll_ok and ppl_diff <= NLL_TOLERANCE and suite_ok):
        notes.append("CHECK FAILED: the new scores differ from the reference")
    return table, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/counterfact-train.json")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="StreamConfig.eval_batch_size")
    parser.add_argument("--heldout-texts", type=int, default=100)
    parser.add_argument("--heldout-tokens", type=int, default=128)
    parser.add_argument("--capability", help="also time this capability profile (e.g. cpu)")
    parser.add_argument("--repeats", type=int, default=1, help="timings: least of this many")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    table, notes = measure(opts)
    lines = ["| part | before (s) | now (s) | ratio | runs, before → now (s) | check |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    print("\n".join(lines + notes))
    if opts.append:
        append_section(f"Evaluation point, {opts.model}: before and after issue 15",
                       command_line("bench.eval_speed", argv),
                       f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
                       "\n".join(lines) + "\n\n" + "; ".join(notes) + ".")


if __name__ == "__main__":
    main()
