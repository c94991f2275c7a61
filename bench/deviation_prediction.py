"""How well the deviation budget's prediction (`tasks/editors/budget.py`) matches the
anchor deviation finished runs measured.

    python -m bench.deviation_prediction --grid-dir /root/rlsedit-runs/grid-fidelity-sweep --append

For every finished single-layer RLSEdit cell with a fixed μ under the grid folders, the
cell's first batch is extracted again exactly as its stream did (same config, context
templates, unedited model), the prediction for the cell's μ after its number of batches is
computed, and set beside the deviation of the cell's final weights
(`bench.sweep_report.final_deviation`). Every cell run with `deviation_budget` gets a second
table from what it logged: per edit layer the μ it chose, the deviation predicted for the
end of the run, and the deviation measured at each of its evaluation points.
"""

from __future__ import annotations

import argparse

import torch

from bench.docs import publish
from bench.sweep_report import read_cells
from tasks.anchor import AnchorArgs, cached_anchor_stats
from tasks.config import from_dict
from tasks.data import load_requests
from tasks.edit_step import apply_edit_batch
from tasks.editors.budget import DeviationPredictor
from tasks.extract.keys import KeyArgs
from tasks.extract.prompts import make_context_templates
from tasks.extract.values import ValueArgs
from tasks.models import load_model


class FirstBatchRecorder:
    """A key/value 'editor' that keeps the batch it is given and changes nothing."""

    needs = "keys_values"

    def __init__(self, weights: dict[int, torch.Tensor]):
        self.W0 = weights
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def weight(self, layer: int) -> torch.Tensor:
        return self.W0[layer]

    def update(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        self.batches[layer] = (K, V)
        return torch.zeros_like(self.W0[layer])


def prediction_row(name: str, summary: dict) -> list[str]:
    cfg = summary["config"]
    settings = summary["editor_settings"]
    (layer,) = summary["edit_layers"]
    lm = load_model(cfg["model"])
    values = from_dict(ValueArgs, cfg["values"])
    templates = make_context_templates(lm, values.n_prefixes, values.prefix_tokens, cfg["seed"])
    requests = load_requests(cfg["data"], limit=cfg["batch_size"], offset=cfg["offset"])
    recorder = FirstBatchRecorder({layer: lm.edit_weight(layer)})
    apply_edit_batch(lm, recorder, requests, templates, (layer,), values,
                     from_dict(KeyArgs, cfg.get("keys", {})))
    K, V = recorder.batches[layer]
    anchor = cached_anchor_stats(lm, [layer], from_dict(AnchorArgs, cfg["anchor"]),
                                 progress=False)[layer]
    W0 = recorder.W0[layer].double()
    predictor = DeviationPredictor(anchor.mean_cov, W0, K, V.double() - K.double() @ W0,
                                   settings["lam"])
    batches = -(-cfg["num_edits"] // cfg["batch_size"])
    predicted = predictor.after(batches, settings["mu"])
    measured = summary["final"]["anchor_deviation"]
    return [name, f"{settings['mu']:g}", str(cfg["num_edits"]), f"{predicted:.3f}",
            f"{measured:.3f}", f"{predicted / measured:.2f}"]


def budget_rows(name: str, summary: dict) -> list[list[str]]:
    """Per edit layer of a budget cell: budget, chosen μ, predicted deviation after the
    planned edits, measured deviation at each evaluation point, predicted / last measured."""
    budget = summary["editor_settings"]["deviation_budget"]
    points = [h for h in summary["history"] if "anchor_deviation" in h]
    rows = []
    for layer in summary["edit_layers"]:
        final = summary["final"]
        predicted = final[f"budget_predicted_deviation.L{layer}"]
        measured = [h[f"anchor_deviation.L{layer}"] for h in points]
        rows.append([name, str(layer), f"{budget:g}", f"{final[f'budget_mu.L{layer}']:.4g}",
                     f"{predicted:.4f}", " / ".join(f"{m:.4f}" for m in measured),
                     f"{predicted / measured[-1]:.2f}"])
    return rows


def budget_table(cells: dict[str, dict]) -> str:
    lines = ["| cell | layer | budget | chosen μ | predicted at the end | measured at "
             "the evaluation points | predicted / last measured |", "|---|---|---|---|---|---|---|"]
    for name, summary in cells.items():
        points = ", ".join(str(h["edits"]) for h in summary["history"] if "anchor_deviation" in h)
        lines += ["| " + " | ".join(r) + " |" for r in budget_rows(f"{name} ({points} edits)", summary)]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid-dir", nargs="+", required=True)
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    rls = {name: s for name, s in read_cells(args.grid_dir).items()
           if s["editor_settings"]["kind"] == "rls"}
    fixed = {name: s for name, s in rls.items()
             if len(s["edit_layers"]) == 1 and s["editor_settings"].get("deviation_budget") is None}
    budgets = {name: s for name, s in rls.items()
               if s["editor_settings"].get("deviation_budget") is not None}
    parts = []
    if fixed:
        lines = ["| cell | μ | edits | predicted deviation (first batch) | measured | "
                 "predicted / measured |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(prediction_row(name, s)) + " |" for name, s in fixed.items()]
        parts.append("\n".join(lines))
    if budgets:
        parts.append(budget_table(budgets))
    body = "\n\n".join(parts)
    publish(body, args.append, "Deviation budget: predicted against measured anchor deviation",
            "bench.deviation_prediction", argv)


if __name__ == "__main__":
    main()
