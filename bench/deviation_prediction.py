"""How well the deviation budget's prediction (`tasks/editors/budget.py`) matches the
anchor deviation finished runs measured.

    python -m bench.deviation_prediction --grid-dir /root/rlsedit-runs/grid-fidelity-sweep --append

For every finished single-layer RLSEdit cell under the grid folders, the cell's first batch
is extracted again exactly as its stream did (same config, context templates, unedited
model), the prediction for the cell's μ after its number of batches is computed, and set
beside the deviation of the cell's final weights (`bench.sweep_report.final_deviation`).
"""

from __future__ import annotations

import argparse

import torch

from bench.docs import append_section, command_line
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid-dir", nargs="+", required=True)
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    cells = {name: s for name, s in read_cells(args.grid_dir).items()
             if s["editor_settings"]["kind"] == "rls" and len(s["edit_layers"]) == 1}
    lines = ["| cell | μ | edits | predicted deviation (first batch) | measured | predicted / measured |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(prediction_row(name, s)) + " |" for name, s in cells.items()]
    body = "\n".join(lines)
    print(body)
    if args.append:
        append_section("Deviation budget: predicted against measured anchor deviation",
                       command_line("bench.deviation_prediction", argv), "this machine", body)


if __name__ == "__main__":
    main()
