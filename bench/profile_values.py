"""Where the time of one edit goes, and what each optimisation of the target-value
optimisation buys, measured side by side in one process on the same edits.

    python -m bench.profile_values --model smollm2-135m --edits 20 --append

Variants (all with the same templates, steps, learning rate and loss):
- plain:    full forward of all blocks with a hook adding the delta, logits at every
            position, fixed step count (the first version's design);
- replay:   only blocks after the edit layer are re-run, logits only where scored, edits
            grouped in buckets of similar suffix length;
- +prefix:  the prefix before the subject's last token enters as a key/value cache;
- +stop:    edits leave the batch once their target NLL < 5e-2 (the shipped code).
Each at the batch sizes given (default 1 and 10). Prints seconds per edit and appends a table to
docs/benchmarks.md with --append.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.docs import append_section, command_line
from tasks.data import load_requests
from tasks.extract.hooks import first_tensor
from tasks.extract.keys import group_mean
from tasks.extract.prompts import kl_batch, make_context_templates, rewrite_batch
from tasks.extract import values as values_mod
from tasks.extract.values import ValueArgs, compute_target_values
from tasks.models import load_model


def plain_values(lm, layer, rewrite, groups, kl, args: ValueArgs):
    """The unoptimised reference: whole-model forward + backward per step, full logits."""
    n_edits = kl.input_ids.shape[0]
    ids = torch.cat([F.pad(rewrite.input_ids, (0, max(0, kl.input_ids.shape[1] - rewrite.input_ids.shape[1]))),
                     F.pad(kl.input_ids, (0, max(0, rewrite.input_ids.shape[1] - kl.input_ids.shape[1])))])
    width = ids.shape[1]
    mask = torch.cat([F.pad(rewrite.attention_mask, (0, width - rewrite.input_ids.shape[1])),
                      F.pad(kl.attention_mask, (0, width - kl.input_ids.shape[1]))])
    labels = F.pad(rewrite.labels, (0, width - rewrite.labels.shape[1]), value=-100)
    lookup = torch.cat([rewrite.lookup, kl.lookup])
    edit_of_row = torch.cat([groups, torch.arange(n_edits)])
    n_rw = rewrite.input_ids.shape[0]
    delta = torch.zeros(n_edits, lm.model.config.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=args.lr)

    def add_delta(_m, _i, output):
        hidden = first_tensor(output)
        shift = torch.zeros_like(hidden).index_put(
            (torch.arange(len(lookup)), lookup), delta[edit_of_row])
        return (hidden + shift,) + tuple(output[1:]) if isinstance(output, tuple) else hidden + shift

    with torch.no_grad():
        kl_init = F.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits[
            torch.arange(n_rw, len(ids)), kl.last], -1)
    handle = lm.block(layer).register_forward_hook(add_delta)
    try:
        for _ in range(args.steps):
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
            logp = F.log_softmax(logits, -1)
            rows, pos = torch.nonzero(labels != -100, as_tuple=True)
            nll_tok = -logp[rows, pos, labels[rows, pos]]
            row_nll = group_mean(nll_tok[:, None], rows, n_rw).squeeze(1)
            nll = group_mean(row_nll[:, None], groups, n_edits).squeeze(1)
            kl_logp = logp[torch.arange(n_rw, len(ids)), kl.last]
            kl_div = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            loss = (nll + args.kl_factor * kl_div).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    return delta.detach()


def time_variant(name, lm, layer, requests, templates, batch_size, args):
    total = 0.0
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        rewrite, groups = rewrite_batch(lm.tokenizer, chunk, templates)
        kl = kl_batch(lm.tokenizer, chunk)
        tic = time.perf_counter()
        if name == "plain":
            plain_values(lm, layer, rewrite, groups, kl, args)
        else:
            compute_target_values(lm, layer, rewrite, groups, kl, args)
        total += time.perf_counter() - tic
    return total / len(requests)


def value_parser(description: str, edits: int, batch_sizes: list[int]) -> argparse.ArgumentParser:
    """--model, --data, --edits, --batch-sizes and --append of the value benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/counterfact-train.json")
    parser.add_argument("--edits", type=int, default=edits)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes)
    parser.add_argument("--append", action="store_true")
    return parser


def value_setup(opts):
    """(model, its last edit layer, the first `opts.edits` requests, the context
    templates), seeded: what a value benchmark optimises."""
    torch.manual_seed(0)
    lm = load_model(opts.model)
    requests = load_requests(opts.data, limit=opts.edits)
    base = ValueArgs()
    templates = make_context_templates(lm, base.n_prefixes, base.prefix_tokens, seed=0)
    return lm, lm.spec.edit_layers[-1], requests, templates


def value_report(text: str, heading: str, module: str, opts, argv) -> None:
    """Print a value benchmark's table; with --append, add it to docs/benchmarks.md under
    `heading`, the model, the edits, the command line and the machine's thread count."""
    print(text)
    if opts.append:
        append_section(f"{heading}, {opts.model}, {opts.edits} edits of {Path(opts.data).name}",
                       command_line(module, argv),
                       f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads", text)


def main(argv=None):
    opts = value_parser(__doc__.split("\n")[0], 20, [1, 10]).parse_args(argv)
    lm, layer, requests, templates = value_setup(opts)
    base = ValueArgs()
    never_stop = replace(base, early_stop=-1.0)   # the NLL stop never met
    rows = []
    real_split = values_mod.split_at_lookup
    for batch_size in opts.batch_sizes:
        for name, args, split in [("plain", never_stop, real_split),
                                  ("replay", never_stop, None),
                                  ("replay+prefix", never_stop, real_split),
                                  ("replay+prefix+stop", base, real_split)]:
            if name == "replay":
                values_mod.split_at_lookup = lambda b: _no_prefix(b, real_split)
            else:
                values_mod.split_at_lookup = real_split
            seconds = time_variant(name, lm, layer, requests, templates, batch_size, args)
            rows.append((batch_size, name, seconds))
            print(f"batch {batch_size:3d}  {name:20s} {seconds:6.2f} s/edit", flush=True)
    values_mod.split_at_lookup = real_split
    plain = {b: s for b, n, s in rows if n == "plain"}
    table = ["| batch | variant | s per edit | speed-up over plain |", "|---|---|---|---|"]
    table += [f"| {b} | {n} | {s:.2f} | {plain[b] / s:.1f}x |" for b, n, s in rows]
    value_report("\n".join(table), "Target-value optimisation", "bench.profile_values", opts, argv)


def _no_prefix(batch, real_split):
    """Replay whole rows: a split whose prefix is empty (lookup moved into the suffix)."""
    lookup = batch.lookup.clone()
    moved = replace(batch, lookup=torch.zeros_like(lookup))
    prefix_ids, mask_p, pos_p, suffix, suffix_pos = real_split(moved)
    suffix = replace(suffix, lookup=lookup)
    return prefix_ids, mask_p, pos_p, suffix, suffix_pos


if __name__ == "__main__":
    main()
