"""Does a written edit land where its target value was optimised? Old rule against new.

    python -m bench.write_fidelity --model gemma3-270m --layer 4 --num-edits 10 --append

For edits of counterfact-train.json, the target value is optimised at `--layer` and the
residual-stream change r it asks for at the bare prompt is read. The old rule wrote r as
the change at the projection's output; the new one writes the optimised projection change
δ, rescaled so the output keeps its length (`rescaled_change`). Each is pushed through
the block's post-MLP norm (if any) and compared with r: ‖stream change made − r‖ / ‖r‖
per edit (what an exact write at the key gives), with the length of what is written over
‖m‖. Also prints the norm's gain range, which is why the old rule fails there.
"""

from __future__ import annotations

import argparse

import torch

from bench.docs import publish
from tasks.data import load_requests
from tasks.extract.prompts import kl_batch, make_context_templates, prompt_batch, rewrite_batch
from tasks.extract.values import ValueArgs, compute_target_values
from tasks.extract.write_space import (norm_gain, projection_outputs_at, rescaled_change,
                                      stream_change)
from tasks.models import load_model

TRAIN = "../shared/data/counterfact/counterfact-train.json"


def relative_miss(norm, m: torch.Tensor, change: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """‖stream change that `change` at the projection makes − wanted‖ / ‖wanted‖ [E]."""
    made = stream_change(norm, m, change)
    return (made - wanted).norm(dim=1) / wanted.norm(dim=1)


def measure(model: str, layer: int, num_edits: int) -> str:
    lm = load_model(model)
    requests = load_requests(TRAIN, limit=num_edits)
    templates = make_context_templates(lm, 5, 10, seed=0)
    rewrite, groups = rewrite_batch(lm.tokenizer, requests, templates)
    target = compute_target_values(lm, layer, rewrite, groups, kl_batch(lm.tokenizer, requests),
                                   ValueArgs())
    wanted = target.stream_target - target.stream_init
    norm = lm.mlp_post_norm(layer)
    m = projection_outputs_at(lm, layer, prompt_batch(lm.tokenizer, requests))
    rules = (("old: stream change written at the projection", wanted),
             ("optimised projection change δ", target.delta),
             ("new: δ rescaled to keep ‖m‖", rescaled_change(norm, m, target.delta)))
    lines = ["| write rule | median miss | max miss | mean ‖written‖/‖m‖ |", "|---|---|---|---|"]
    with torch.no_grad():
        for name, change in rules:
            miss = relative_miss(norm, m, change, wanted)
            size = (change.norm(dim=1) / m.norm(dim=1)).mean()
            lines.append(f"| {name} | {miss.median():.2e} | {miss.max():.2e} | {size:.2f} |")
    if norm is not None:
        gain = norm_gain(norm, m.shape[-1], m.float())
        lines.append(f"\nPost-MLP norm gains of layer {layer}: {float(gain.min()):.3g} to "
                     f"{float(gain.max()):.3g} (median {float(gain.median()):.3g}).")
    lines.append(f"Mean ‖δ‖/‖reference‖: {float(target.delta_ratio.mean()):.2f}; mean final "
                 f"target NLL {float(target.nll.mean()):.3f}.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--num-edits", type=int, default=10)
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    body = measure(args.model, args.layer, args.num_edits)
    publish(body, args.append, f"Where an edit lands: {args.model} layer {args.layer}, "
            f"{args.num_edits} edits of counterfact-train.json", "bench.write_fidelity", argv)


if __name__ == "__main__":
    main()
