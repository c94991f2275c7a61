"""How much of an edit's residual one RLS update writes, as a function of λ and μ.

For a single key k, the update changes the layer's output at k by
kPkᵀ / (1 + kPkᵀ) of the requested residual, with P = (λI + μ K0ᵀK0)⁻¹ before any edit.
With raw (unnormalised) anchor statistics, μ's effect scales with the anchor token count.

    python -m bench.write_fraction --edits 50 --append
"""

from __future__ import annotations

import argparse

import torch

from bench.docs import append_section, command_line
from tasks.anchor import AnchorArgs, cached_anchor_stats
from tasks.data import load_requests
from tasks.editors.rls import with_weights
from tasks.extract.keys import compute_keys
from tasks.extract.prompts import make_context_templates, rewrite_batch
from tasks.extract.values import ValueArgs
from tasks.models import load_model

GRID = [(1.0, 0.01), (1.0, 0.003), (1.0, 0.001), (1.0, 0.0003), (1.0, 0.0001)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/counterfact-train.json")
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--checkpoint", nargs="*", default=[],
                        help="edit-stream checkpoints whose current P to evaluate too")
    parser.add_argument("--append", action="store_true")
    opts = parser.parse_args(argv)
    lm = load_model(opts.model)
    layer = lm.spec.edit_layers[-1]
    values = ValueArgs()
    templates = make_context_templates(lm, values.n_prefixes, values.prefix_tokens, seed=0)
    requests = load_requests(opts.data, limit=opts.edits)
    rewrite, groups = rewrite_batch(lm.tokenizer, requests, templates)
    keys = compute_keys(lm, layer, rewrite, groups, len(requests)).double()
    anchor = cached_anchor_stats(lm, [layer], AnchorArgs(), progress=False)[layer]
    lines = ["| λ | μ | mean kPkᵀ | share of the residual written |", "|---|---|---|---|"]
    for lam, mu in GRID:
        precision = mu * anchor.cov
        precision.diagonal().add_(lam)
        quad = (keys @ torch.linalg.inv(precision) * keys).sum(1)
        lines.append(f"| {lam} | {mu} | {quad.mean():.2f} | {(quad / (1 + quad)).mean():.3f} |")
    for path in opts.checkpoint:
        state = torch.load(path, weights_only=False)
        rls = with_weights(state["editor"])["states"][layer]   # any version's layout
        quad = (keys @ rls["P"] * keys).sum(1)
        lines.append(f"| after {state['position']} edits of {path} | | {quad.mean():.2f} | "
                     f"{(quad / (1 + quad)).mean():.3f} |")
    table = "\n".join(lines)
    note = (f"{len(requests)} edit keys of {opts.data.split('/')[-1]}, layer {layer}, anchor "
            f"statistics over {anchor.count} AG News tokens (mean key ‖k‖² "
            f"{(keys * keys).sum(1).mean():.1f}, mean anchor ‖k‖² "
            f"{anchor.cov.trace() / anchor.count:.1f})")
    print(note)
    print(table)
    if opts.append:
        append_section(f"Share of each edit that one RLS update writes, {opts.model}",
                       command_line("bench.write_fraction", argv), "this machine",
                       f"{note}.\n\n{table}")


if __name__ == "__main__":
    main()
