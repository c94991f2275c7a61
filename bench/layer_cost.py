"""What each edited layer buys and costs: a cell's final weights with one layer put back to
its unedited weights, and with one layer edited alone.

    python -m bench.layer_cost /root/rlsedit-runs/grid-tune-s14-both/cells/smollm2-135m-rls-1k-p10-rw1-s0 --append

An editor spread over several layers (MEMIT's residual spread, RLSEdit over layers 2-6)
writes part of each edit at each layer. Which layer costs the held-out perplexity, and
which one carries the edits? For a cell folder (its `summary.json` names the model, data
and layers; `edited_layers.safetensors` holds the final weights) this scores, on the
model with
- every edited layer written in (`all`),
- all but layer l written in (`all but L<l>`: what the others write without it),
- only layer l written in (`only L<l>`: what it writes by itself),
with `--without-top R ...`, every layer's change ΔW with its top R singular directions
taken out (`all, top R out`: with R = 1, the one output direction the change writes most
along, projected out of all of it), and the unedited model, the held-out token perplexity (the evaluators' texts and
lm-eval's `rlsedit_agnews_ppl`) and efficacy, generalization and specificity over
`--edits` of the stream's edits spread evenly over it; with `--capability-limit N`, SST-2
and AG News on their first N documents (the evaluation points score 200). `--snapshot N`
scores the weights the cell logged after N edits (`snapshots/edits-N.safetensors`, its
first N edits) instead of its final ones. Forward passes only. Scores are kept in
`--cache` (JSON), so that a run can stop and go on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.docs import publish
from bench.sweep_report import with_se
from pipelines.report import _value
from tasks.corpus import HeldoutArgs
from tasks.data import load_requests
from tasks.evaluate.capability import (CapabilityArgs, CapabilitySuite, heldout_perplexity,
                                       heldout_suite)
from tasks.evaluate.metrics import aggregate, score_requests
from tasks.models import load_model

METRICS = ("efficacy", "generalization", "specificity")
CAPABILITY = {"rlsedit_sst2.acc": "SST-2", "rlsedit_agnews.acc": "AG News"}   # the cpu suite
SST2_SENTENCES = 872   # its test split: the most documents both tasks can score


def weight_sets(edited: dict[str, torch.Tensor],
                per_layer: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{label: the weights to write in}: none, all, and (`per_layer`) all but one layer and
    one layer only. `edited` maps each edited layer's parameter name to its final weight."""
    names = sorted(edited, key=layer_of) if per_layer else []
    sets = {"unedited": {}, "all": dict(edited)}
    for name in names:
        sets[f"all but L{layer_of(name)}"] = {n: w for n, w in edited.items() if n != name}
    for name in names:
        sets[f"only L{layer_of(name)}"] = {name: edited[name]}
    return sets


def without_top(edited: dict[str, torch.Tensor], unedited: dict[str, torch.Tensor],
                ranks: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """{`all, top R out`: the weights with each layer's change ΔW = edited − unedited
    ([d_v, d_k], torch's layout) less its top R singular components} for R in `ranks`."""
    sets = {f"all, top {r} out": {} for r in ranks}
    for name, weight in edited.items():
        change = (weight - unedited[name]).double()
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
        for r in ranks:
            kept = change - (u[:, :r] * s[:r]) @ vh[:r]
            sets[f"all, top {r} out"][name] = (unedited[name].double() + kept).to(weight.dtype)
    return sets


def top_shares(edited: dict[str, torch.Tensor], unedited: dict[str, torch.Tensor],
               ranks: list[int]) -> dict[str, list[float]]:
    """{parameter name: [share of ‖ΔW‖²_F in its top R singular values, for R in `ranks`]}."""
    shares = {}
    for name, weight in sorted(edited.items(), key=lambda item: layer_of(item[0])):
        energy = torch.linalg.svdvals((weight - unedited[name]).double()).pow(2)
        shares[name] = [float(energy[:r].sum() / energy.sum()) for r in ranks]
    return shares


def layer_of(name: str) -> int:
    """The block number in a parameter name such as `model.layers.4.mlp.down_proj.weight`."""
    return next(int(part) for part in name.split(".") if part.isdigit())


def evenly_spread(n_done: int, k: int) -> list[int]:
    """k indices of the first n_done edits, evenly spread (all of them when k >= n_done)."""
    if k >= n_done:
        return list(range(n_done))
    return [round(i * (n_done - 1) / (k - 1)) for i in range(k)]


@torch.no_grad()
def score_set(lm, weights: dict, requests, heldout: CapabilitySuite,
              capability: CapabilitySuite | None = None) -> dict:
    """Held-out perplexity (`heldout`: `heldout_suite`), the CounterFact shares and
    (`capability`: the `cpu` suite) SST-2 and AG News on the model with `weights` written in."""
    with lm.layers_loaded(weights):
        scores = aggregate(score_requests(lm, requests))
        ppl = heldout_perplexity(heldout)
        tasks = capability.score() if capability else {}
    return {"perplexity": ppl, **{k: v for k, v in scores.items()
                                   if k.removesuffix("_se") in METRICS},
            **{k: v for k, v in tasks.items() if k in CAPABILITY}}


def weights_file(cell_dir: Path, snapshot: int | None = None) -> Path:
    """The cell's final edited layers, or (`snapshot`) those logged after that many edits."""
    if snapshot is None:
        return cell_dir / "edited_layers.safetensors"
    return cell_dir / "snapshots" / f"edits-{snapshot}.safetensors"


def measure(cell_dir: Path, k: int, cache: Path | None, ranks: list[int] = (),
            per_layer: bool = True, capability_limit: int | None = None,
            snapshot: int | None = None) -> dict[str, dict]:
    """{weight-set label: scores} for the cell's final weights or its `snapshot`
    (`weight_sets`; with each of `ranks`, its top singular directions out of every layer's
    change; with `capability_limit`, SST-2 and AG News on that many documents each); read
    from and added to `cache`."""
    summary = json.loads((cell_dir / "summary.json").read_text())
    config = summary["config"]
    results = json.loads(cache.read_text()) if cache and cache.exists() else {}
    key = (f"{cell_dir.resolve()} edits={k}"
           + (f" capability={capability_limit}" if capability_limit else "")
           + (f" snapshot={snapshot}" if snapshot is not None else ""))
    done = results.setdefault(key, {})
    edited = load_file(str(weights_file(cell_dir, snapshot)))
    sets = weight_sets(edited, per_layer)
    labels = [*sets, *(f"all, top {r} out" for r in ranks)]
    if all(label in done for label in labels):
        return {label: done[label] for label in labels}
    lm = load_model(config["model"])
    if ranks:
        unedited = {name: lm.model.get_parameter(name).detach().clone() for name in edited}
        sets.update(without_top(edited, unedited, ranks))
        print("share of each change in its top " + ", ".join(map(str, ranks)) + ": "
              + "; ".join(f"L{layer_of(n)} " + ", ".join(f"{v:.2f}" for v in shares)
                          for n, shares in top_shares(edited, unedited, ranks).items()),
              flush=True)
    n_done = snapshot or len(summary["edit_records"])
    requests = load_requests(config["data"], limit=n_done)
    requests = [requests[i] for i in evenly_spread(len(requests), k)]
    heldout = HeldoutArgs(**config.get("heldout", {}))   # a grid's cell names every field
    suite = heldout_suite(lm, heldout)
    capability = (CapabilitySuite(lm, CapabilityArgs(profile="cpu", limit=capability_limit))
                  if capability_limit else None)
    for label, weights in sets.items():
        if label in done:
            continue
        done[label] = score_set(lm, weights, requests, suite, capability)
        print(f"{label}: ppl {done[label]['perplexity']:.2f}, "
              f"efficacy {done[label]['efficacy']:.3f}", flush=True)
        if cache:
            cache.write_text(json.dumps(results, indent=1))
    return {label: done[label] for label in labels}


def table(results: dict[str, dict], capability_limit: int | None = None) -> str:
    """Markdown: one row per weight set (SST-2 and AG News ± binomial standard error over
    `capability_limit` documents, where scored)."""
    tasks = list(CAPABILITY) if capability_limit else []
    header = ["weights", "held-out token ppl", *METRICS, *(CAPABILITY[t] for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in results.items():
        cells = [f"{row['perplexity']:.2f}", *(_value(row, m) for m in METRICS),
                 *(with_se(row[t], capability_limit) for t in tasks)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell_dir", type=Path, help="a grid's cells/<name> folder")
    parser.add_argument("--edits", type=int, default=100,
                        help="edits scored, evenly spread over the stream")
    parser.add_argument("--without-top", type=int, nargs="+", default=[], metavar="R",
                        help="also score each layer's change less its top R singular "
                             "directions")
    parser.add_argument("--no-per-layer", action="store_true",
                        help="skip the all-but-one and one-layer-only sets")
    parser.add_argument("--capability-limit", type=int, metavar="N",
                        help="also score SST-2 and AG News (the cpu suite) on N documents "
                             f"each; at most {SST2_SENTENCES}, SST-2's test sentences")
    parser.add_argument("--snapshot", type=int, metavar="N",
                        help="score the weights logged after N edits (snapshots/edits-N)")
    parser.add_argument("--cache", type=Path, help="JSON of scores so far (resumes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    if opts.capability_limit and not 0 < opts.capability_limit <= SST2_SENTENCES:
        raise SystemExit(f"--capability-limit must be 1 to {SST2_SENTENCES} (SST-2 has "
                         f"{SST2_SENTENCES} test sentences)")
    if not weights_file(opts.cell_dir, opts.snapshot).is_file():
        raise SystemExit(f"{opts.cell_dir} holds no {weights_file(Path(), opts.snapshot)}: "
                         "give a finished cell's folder (cells/<name> of a grid) and a "
                         "snapshot it logged")
    torch.set_num_threads(opts.threads)
    results = measure(opts.cell_dir, opts.edits, opts.cache, opts.without_top,
                      not opts.no_per_layer, opts.capability_limit, opts.snapshot)
    publish(table(results, opts.capability_limit), opts.append, heading(opts),
            "bench.layer_cost", argv, f"this machine, {opts.threads} thread(s)")


def heading(opts) -> str:
    """The docs section's title: what was scored, on which weights of which cell."""
    what = ("Each edited layer's share" if not opts.no_per_layer
            else "The change less its top singular directions" if opts.without_top
            else "Edited against unedited")
    when = f" after {opts.snapshot} edits" if opts.snapshot else ""
    tasks = (f", SST-2 and AG News on {opts.capability_limit} documents"
             if opts.capability_limit else "")
    return f"{what}: {opts.cell_dir.name}{when}, {opts.edits} of its edits{tasks}"


if __name__ == "__main__":
    main()
