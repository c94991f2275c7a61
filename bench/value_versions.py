"""The target-value optimisation of an earlier commit against today's, side by side in one
process on the same edits, with the same settings: seconds per edit and whether the results
are the same (issue 15, item 1: changes to the hot path must not change what it computes).

    python -m bench.value_versions --before d8fafef --edits 30 --batch-sizes 10 --append

The earlier `tasks/extract/values.py` is read from git and imported beside today's (its
own imports resolve to today's helpers, so only commits whose helpers still fit can be
compared). The two take turns on each batch, so that load from other processes falls on
both alike. Settings: the streams' default, the 2-nat margin stop, for both unless
`--before-variant`/`--today-variant` name another of `bench.value_stops`' variants (then the
difference columns say how far the two settings' results are apart, not an error):

    python -m bench.value_versions --before d8fafef --before-variant nll \
        --today-variant margin2-bf16 --edits 50 --batch-sizes 10 --append
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.profile_values import value_parser, value_report, value_setup
from bench.value_stops import VARIANTS, Tally, optimise_chunk
from tasks.extract import values

ROOT = Path(__file__).resolve().parents[1]


def values_at(rev: str):
    """`tasks/extract/values.py` as it was at commit `rev`, imported as a module."""
    source = subprocess.run(["git", "show", f"{rev}:tasks/extract/values.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"values_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def largest_difference(a, b) -> dict:
    """Largest |difference| of the deltas and margins of two TargetValues; whether their
    Adam steps are equal."""
    return {"delta": float((a.delta - b.delta).abs().max()),
            "margin": float((a.margin - b.margin).abs().max()),
            "steps_equal": bool(torch.equal(a.steps, b.steps))}


def larger(a: float, b: float) -> float:
    """max(a, b), NaN when either is (a stop rule without margins has NaN ones)."""
    return a + b if a != a or b != b else max(a, b)


def measure(lm, layer, requests, templates, batch_size: int, versions: dict) -> tuple:
    """({version: Tally}, the largest differences from the first version over all batches);
    `versions`: {name: (values module, variant name)}."""
    tallies = {name: Tally() for name in versions}
    worst = {"delta": 0.0, "margin": 0.0, "steps_equal": True}
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        found = {}
        for name, (module, variant) in versions.items():
            args = module.ValueArgs(**VARIANTS[variant])
            seconds, found[name] = optimise_chunk(lm, layer, chunk, templates, args,
                                                  module.compute_target_values)
            tallies[name].add(seconds, found[name])
        first, last = found.values()
        diff = largest_difference(first, last)
        worst = {"delta": larger(worst["delta"], diff["delta"]),
                 "margin": larger(worst["margin"], diff["margin"]),
                 "steps_equal": worst["steps_equal"] and diff["steps_equal"]}
        print(f"batch {batch_size}: {start + len(chunk)}/{len(requests)} edits "
              + ", ".join(f"{n} {t.seconds / t.edits:.2f} s/edit" for n, t in tallies.items())
              + f"; {diff}", flush=True)
    return tallies, worst


def table(results: dict) -> str:
    lines = ["| batch | version | s per edit | speed-up | Adam steps per edit "
             "| largest delta difference | largest margin difference | same steps |",
             "|---|---|---|---|---|---|---|---|"]
    for batch_size, (tallies, worst) in results.items():
        before, now = tallies.values()
        for name, t in tallies.items():
            same = name == next(iter(tallies))
            lines.append(
                f"| {batch_size} | {name} | {t.seconds / t.edits:.2f} "
                f"| {before.seconds / t.seconds:.2f}x | {t.steps / t.edits:.1f} "
                + ("| | | |" if same else f"| {worst['delta']:.1e} | {worst['margin']:.1e} "
                                          f"| {'yes' if worst['steps_equal'] else 'no'} |"))
    return "\n".join(lines)


def main(argv=None):
    parser = value_parser(__doc__.split("\n")[0], 30, [10])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--before-variant", default="margin2", choices=list(VARIANTS))
    parser.add_argument("--today-variant", default="margin2", choices=list(VARIANTS))
    opts = parser.parse_args(argv)
    lm, layer, requests, templates = value_setup(opts)
    versions = {f"{opts.before} {opts.before_variant}": (values_at(opts.before), opts.before_variant),
                f"today {opts.today_variant}": (values, opts.today_variant)}
    results = {b: measure(lm, layer, requests, templates, b, versions)
               for b in opts.batch_sizes}
    value_report(table(results), "Target-value optimisation before and after",
                 "bench.value_versions", opts, argv)

if __name__ == "__main__":
    main()
