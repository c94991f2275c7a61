"""The target-value optimisation's stop rule and batch size, side by side in one process on
the same edits: seconds per edit and Adam steps per edit (issue 15, item 1).

    python -m bench.value_stops --model smollm2-135m --edits 50 --batch-sizes 10 25 50 --append

Variants (the shipped optimisation otherwise: replay, prefix cache, length buckets):
- nll:     an edit stops once its target NLL < 5e-2 (the default before issue 15);
- margin2: an edit stops once target_new beats ground_truth by 2 nats of mean-token
           log-probability on every prompt (the streams' default since, `tasks/stream.py`);
- margin3: the same with 3 nats;
- margin2-bf16: margin2 with the Adam steps' replays under bfloat16 autocast;
- margin2-warm: margin2 with every delta starting at the mean of the variant's earlier
           deltas (the first batch at zero);
- margin2-lr1: margin2 with Adam's learning rate 1.0 (0.5 otherwise);
- margin2-land, margin2-lr1-land: those two with `values.overshoot: interpolate`, each
           delta moved back along its last step to where the margin meets 2 nats;
- margin2-ngd05, margin2-ngd10, margin2-ngd20: margin2 by normalized gradient descent, not
           Adam: each delta moves 0.05 (0.10, 0.20) × ‖z‖ against its own gradient per step;
- margin3-ngd10: steps of 0.10 × ‖z‖ to a 3-nat margin; margin3-ngd10-bf16: with bfloat16
           replays.
The variants and batch sizes take turns on each round of edits (as many as the largest
batch), so that load from other processes falls on all of them alike. What each costs in
edit quality over a sequential stream is measured by the grid (docs/benchmarks.md,
"Fidelity sweep"), not here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from bench.profile_values import value_parser, value_report, value_setup
from tasks.extract.prompts import kl_batch, rewrite_batch
from tasks.extract.values import ValueArgs, compute_target_values

VARIANTS = {"nll": {"stop_on": "nll"},
            "margin2": {"stop_on": "margin", "margin": 2.0},
            "margin3": {"stop_on": "margin", "margin": 3.0},
            "margin2-bf16": {"stop_on": "margin", "margin": 2.0, "autocast": "bfloat16"},
            "margin2-warm": {"stop_on": "margin", "margin": 2.0},
            "margin2-lr1": {"stop_on": "margin", "margin": 2.0, "lr": 1.0},
            "margin2-land": {"stop_on": "margin", "margin": 2.0, "overshoot": "interpolate"},
            "margin2-lr1-land": {"stop_on": "margin", "margin": 2.0, "lr": 1.0,
                                 "overshoot": "interpolate"},
            "margin2-ngd05": {"stop_on": "margin", "margin": 2.0, "optimizer": "ngd",
                              "ngd_step": 0.05},
            "margin2-ngd10": {"stop_on": "margin", "margin": 2.0, "optimizer": "ngd",
                              "ngd_step": 0.10},
            "margin2-ngd20": {"stop_on": "margin", "margin": 2.0, "optimizer": "ngd",
                              "ngd_step": 0.20},
            "margin3-ngd10": {"stop_on": "margin", "margin": 3.0, "optimizer": "ngd",
                              "ngd_step": 0.10},
            "margin3-ngd10-bf16": {"stop_on": "margin", "margin": 3.0, "optimizer": "ngd",
                                   "ngd_step": 0.10, "autocast": "bfloat16"}}
WARM_STARTED = {"margin2-warm"}   # deltas start at the mean of the variant's earlier ones


@dataclass
class Tally:
    """Seconds, edits, Adam steps, edits the stop rule ended, Σ‖δ‖/‖z‖, the final margins
    (sum, count scored, count under 1 nat) and Σδ/‖δ‖ of one variant."""
    seconds: float = 0.0
    edits: int = 0
    steps: float = 0.0
    stopped: float = 0.0
    delta_ratio: float = 0.0
    margin: float = 0.0
    margins: int = 0
    under_1: int = 0
    delta_sum: torch.Tensor | None = None   # [d] Σδ over the edits so far
    unit_sum: torch.Tensor | None = None    # [d] Σδ/‖δ‖ over the edits so far

    def mean_delta(self) -> torch.Tensor | None:
        return None if self.delta_sum is None else self.delta_sum / self.edits

    def coherence(self) -> float:
        """‖mean of δ/‖δ‖‖ over the edits: 1 when every delta points one way, about
        1/√edits for independent random directions."""
        return float(self.unit_sum.norm()) / self.edits

    def add(self, seconds: float, target) -> None:
        total = target.delta.sum(0)
        self.delta_sum = total if self.delta_sum is None else self.delta_sum + total
        units = (target.delta / target.delta.norm(dim=1, keepdim=True).clamp(min=1e-12)).sum(0)
        self.unit_sum = units if self.unit_sum is None else self.unit_sum + units
        self.seconds += seconds
        self.edits += len(target.steps)
        self.steps += float(target.steps.sum())
        self.stopped += float(target.converged.sum())
        self.delta_ratio += float(target.delta_ratio.sum())
        scored = target.margin[~target.margin.isnan()]
        self.margin += float(scored.sum())
        self.margins += len(scored)
        self.under_1 += int((scored < 1).sum())

    def margin_cells(self) -> str:
        """'mean final margin | share under 1 nat' (blank where no margin was scored)."""
        if not self.margins:
            return " | "
        return f"{self.margin / self.margins:.2f} | {self.under_1 / self.margins:.2f}"


def optimise_chunk(lm, layer, chunk, templates, args: ValueArgs, compute=compute_target_values,
                   init: torch.Tensor | None = None):
    """(seconds, TargetValues) of one batch of requests, as `tasks/edit_step.py` runs it
    (`compute`: compute_target_values or another version of it; `init`: where the deltas
    start, for compute_target_values)."""
    rewrite, groups = rewrite_batch(lm.tokenizer, chunk, templates)
    kl = kl_batch(lm.tokenizer, chunk)
    truth = None
    if args.stop_on == "margin":
        truth = rewrite_batch(lm.tokenizer, chunk, templates, "ground_truth")[0]
    tic = time.perf_counter()
    target = compute(lm, layer, rewrite, groups, kl, args, truth,
                     **({} if init is None else {"init": init}))
    return time.perf_counter() - tic, target


def measure(lm, layer, requests, templates, batch_sizes: list[int], variants: list[str]) -> dict:
    """{batch size: {variant: Tally}} over `requests`, taken in rounds of the largest batch
    size: within a round every batch size and variant optimises the round's edits in turn,
    so that load from other processes falls on all of them alike."""
    tallies = {b: {name: Tally() for name in variants} for b in batch_sizes}
    size = max(batch_sizes)
    for round_start in range(0, len(requests), size):
        chunk_of_round = requests[round_start:round_start + size]
        for batch_size in batch_sizes:
            for start in range(0, len(chunk_of_round), batch_size):
                chunk = chunk_of_round[start:start + batch_size]
                for name in variants:
                    args, tally = replace(ValueArgs(), **VARIANTS[name]), tallies[batch_size][name]
                    seconds, target = optimise_chunk(
                        lm, layer, chunk, templates, args,
                        init=tally.mean_delta() if name in WARM_STARTED else None)
                    tally.add(seconds, target)
        print(f"{round_start + len(chunk_of_round)}/{len(requests)} edits: " + "; ".join(
            f"batch {b} {n} {t.seconds / t.edits:.2f} s/edit"
            for b, by_variant in tallies.items() for n, t in by_variant.items()), flush=True)
    return tallies


def table(results: dict) -> str:
    """Markdown rows per (batch, variant); the ratio is against nll at the first batch size."""
    first = next(iter(results.values()))
    base = first["nll"] if "nll" in first else next(iter(first.values()))
    base_rate = base.seconds / base.edits
    lines = ["| batch | stop | s per edit | speed-up | Adam steps per edit | stopped by the rule "
             "| mean ‖δ‖/‖z‖ | mean final margin (nats) | margin under 1 nat "
             "| ‖mean δ/‖δ‖‖ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for batch_size, tallies in results.items():
        for name, t in tallies.items():
            rate = t.seconds / t.edits
            lines.append(f"| {batch_size} | {name} | {rate:.2f} | {base_rate / rate:.2f}x "
                         f"| {t.steps / t.edits:.1f} | {t.stopped / t.edits:.2f} "
                         f"| {t.delta_ratio / t.edits:.2f} | {t.margin_cells()} "
                         f"| {t.coherence():.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = value_parser(__doc__.split("\n")[0], 50, [10, 25, 50])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    opts = parser.parse_args(argv)
    lm, layer, requests, templates = value_setup(opts)
    results = measure(lm, layer, requests, templates, opts.batch_sizes, opts.variants)
    value_report(table(results), "Target-value stop rule and batch size", "bench.value_stops",
                 opts, argv)

if __name__ == "__main__":
    main()
