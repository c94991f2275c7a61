"""One cell: one model × one editor (or a variant of one) × one seed × one stream config,
run in this process (`pipelines.edit_stream`) or as Ray actors (`pipelines.grid`), logged
the same way either way.

The editor (`tasks.remote.actors.EditorActor.run`) applies the stream and yields events: resumed,
progress, a snapshot at each evaluation point, done. An evaluator
(`tasks.remote.actors.Evaluator.evaluate`) scores each snapshot: the CounterFact metrics,
retention, held-out perplexity and the capability suite. `CellRecord` turns both into
what a cell leaves behind:
- its MLflow run: params and config, the unedited scores at step 0, the editor's speed and
  step statistics and the evaluator's scores at step = edits applied, the snapshots, the
  final edited layers and the summary;
- in its folder: `evals.json` (the scores of each evaluation point, which a resumed run
  does not score again), `final_scores.json` (per request) and `summary.json`.

`run_local` scores each snapshot before the next batch; the grid edits and scores at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

from pipelines.tracking import Tracker, check_store, tracking_store
from tasks.config import flatten, from_dict
from tasks.editors import resolve_editor
from tasks.errors import UserError
from tasks.models import resolve_device
from tasks.progress import Progress
from tasks.storage import Location
from tasks.stream import StreamConfig, config_changes, named, snapshot_path

log = logging.getLogger("rlsedit.cell")
EDITED_LAYERS = "edited_layers.safetensors"


@dataclass
class Cell:
    name: str
    model: str
    editor: str        # its label: a registry editor, or a variant of one (grid `variants`)
    cfg: dict          # StreamConfig as a dict
    dir: Location


def save_json(path: Location, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def load_weights(path: Location) -> dict:
    """A snapshot file's tensors as numpy arrays, by parameter name."""
    from safetensors.torch import load_file

    with path.local_copy() as local:
        return {k: v.numpy() for k, v in load_file(str(local)).items()}


def save_weights(path: Location, weights: dict) -> Location:
    """Numpy arrays by parameter name to `path` (safetensors, atomically)."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    path.write_with(lambda tmp: save_file(tensors, str(tmp)))
    return path


def open_cell_run(tracker: Tracker, cell: Cell, baseline: dict,
                  parent: str | None = None) -> str:
    """A new MLflow run for `cell` (a child of `parent` where given): its stream config and
    editor settings as params (`editor.<key>`) and config.json, the unedited scores at step
    0. Its run id."""
    settings = resolve_editor(cell.cfg["editor"], cell.cfg["editor_args"])[2]
    run_id = tracker.new_run(cell.name, {**cell.cfg, "editor_settings": settings}, parent,
                             params={**flatten(cell.cfg), **flatten(settings, "editor.")})
    tracker.metrics(run_id, {f"unedited_{k}": v for k, v in baseline.items()}, 0)
    return run_id


Score = Callable[[int, dict], None]   # score(edits, snapshot weights): now or by an actor


class CellRecord:
    """One cell's scores, speed and MLflow run while it runs; `finish` writes its summary."""

    def __init__(self, cell: Cell, tracker: Tracker, run_id: str, baseline: dict):
        self.cell, self.tracker, self.run_id, self.baseline = cell, tracker, run_id, baseline
        path = cell.dir / "evals.json"
        self.results: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
        self.speed: dict[int, dict] = {}
        self.scoring: set[int] = set()   # evaluation points handed to an evaluator
        self.done: dict | None = None    # the editor's summary, once it has finished
        self.restarts = 0                # times Ray restarted the cell's editor actor

    @property
    def finished(self) -> bool:
        return self.done is not None and not self.scoring

    def on_event(self, event: dict, score: Score, progress: Progress) -> None:
        """Act on one of the editor's events (`EditorActor.run`); `score(n, weights)` has
        the snapshot after n edits scored, now or later (then `on_scored` follows)."""
        name = self.cell.name
        if event.get("resumed"):
            if event["restarted"]:
                self.restarts += 1
                log.warning("%s: editor actor restarted by Ray, at edit %d", name,
                            event["edits"])
            progress.resume(name, event["edits"])
            self._rescore(event["history"], score)
        elif event.get("progress"):
            progress.update(name, event["edits"])
        elif event.get("done"):
            self.done = event["summary"]
            self.tracker.file(self.run_id, save_weights(self.cell.dir / EDITED_LAYERS,
                                                        event["edited"]))
        else:
            n = event["edits"]
            progress.update(name, n)
            path = snapshot_path(self.cell.dir, n)
            if not path.exists():   # the editor runs on a node without this file system
                save_weights(path, event["snapshot"])
            self._evaluation_point(n, event["speed"])
            score(n, event["snapshot"])

    def _evaluation_point(self, n: int, speed: dict) -> None:
        """The snapshot after `n` edits logged, the editor's speed then logged and kept."""
        self.tracker.file(self.run_id, snapshot_path(self.cell.dir, n), "snapshots")
        self.speed[n] = speed = {k: v for k, v in speed.items() if k != "edits"}
        self.tracker.metrics(self.run_id, speed, n)
        self.scoring.add(n)

    def _rescore(self, history: list[dict], score: Score) -> None:
        """Score the evaluation points a crash left unscored, from the snapshots the editor
        wrote before each checkpoint; keep the speed of those scored before it."""
        for record in history:
            n = record["edits"]
            if str(n) in self.results or n in self.scoring:
                self.speed.setdefault(n, {k: v for k, v in record.items() if k != "edits"})
                continue
            path = snapshot_path(self.cell.dir, n)
            if not path.exists():
                log.warning("%s: no snapshot after %d edits in %s; that evaluation point "
                            "stays empty", self.cell.name, n, self.cell.dir / "snapshots")
                continue
            log.info("%s: scoring the snapshot after %d edits left unscored", self.cell.name, n)
            self._evaluation_point(n, record)
            score(n, load_weights(path))

    def on_scored(self, n: int, metrics: dict) -> None:
        """The evaluator's scores of the snapshot after `n` edits: kept, saved, logged."""
        if "per_request" in metrics:   # the final evaluation's scores per request
            save_json(self.cell.dir / "final_scores.json", metrics.pop("per_request"))
        self.results[str(n)] = metrics
        self.scoring.discard(n)
        save_json(self.cell.dir / "evals.json", self.results)
        self.tracker.metrics(self.run_id, metrics, n)
        log.info("%s at %d edits: efficacy %.3f, retention %.3f", self.cell.name, n,
                 metrics["efficacy"], metrics["retention_efficacy"])

    def finish(self) -> dict:
        """The cell's summary (the editor's, with every evaluation point's scores and speed
        as its history), written to summary.json and logged; the run ended."""
        summary = dict(self.done)
        history = [{"edits": n, **self.results[str(n)], **self.speed.get(n, {})}
                   for n in sorted(int(k) for k in self.results)]
        scores_path = self.cell.dir / "final_scores.json"
        summary.update(history=history, final={**history[-1], **summary["final"]},
                       unedited=self.baseline, mlflow_run_id=self.run_id,
                       editor_restarts=self.restarts,
                       final_scores=(json.loads(scores_path.read_text())
                                     if scores_path.exists() else None))
        save_json(self.cell.dir / "summary.json", summary)
        self.tracker.metrics(self.run_id, {k: v for k, v in summary["final"].items()
                                           if k not in history[-1]},
                             summary["config"]["num_edits"])
        self.tracker.metrics(self.run_id, {"skipped_records": len(summary["skipped_records"]),
                                           "editor_restarts": self.restarts}, 0)
        if summary["skipped_records"]:
            self.tracker.dict(self.run_id, {"skipped": summary["skipped_records"]},
                              "skipped_records.json")
        self.tracker.dict(self.run_id, summary, "summary.json")
        self.tracker.end(self.run_id)
        return summary


def finished_summary(cell: Cell, cfg: StreamConfig) -> dict | None:
    """The summary of `cell` when it has finished with this config; a UserError when it
    finished with another."""
    path = cell.dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if changed := config_changes(summary["config"], cfg):
        raise UserError(f"{cell.dir} holds a finished stream of a different config "
                        f"({named(changed)}); remove it or choose another output_dir")
    return summary


def run_local(cell: Cell) -> dict:
    """Run (or resume) `cell` in this process: edit, score each snapshot, log (see the
    module's docstring); its summary. The cell's MLflow run id is kept in `run.json` in its
    folder, so a re-run goes on in the same run."""
    from tasks.remote.actors import EditorActor, Evaluator

    cfg = from_dict(StreamConfig, cell.cfg)
    state_path = cell.dir / "run.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    check_store(state, state.get("run_id"), cell.dir)
    if (finished := finished_summary(cell, cfg)) is not None:
        return finished
    evaluator = Evaluator(cell.model, device=resolve_device(cfg.device))
    baseline = evaluator.baseline(cell.cfg, cfg.heldout, cfg.capability)
    editor = EditorActor(cell.cfg, baseline)
    editor.open(None)   # a checkpoint that cannot go on stops the cell before anything is logged
    tracker = Tracker(cfg.experiment)
    if state.get("run_id") is None:
        state = {"run_id": open_cell_run(tracker, cell, baseline),
                 "tracking_store": tracking_store()}
        save_json(state_path, state)
    record = CellRecord(cell, tracker, state["run_id"], baseline)

    def score(n: int, weights: dict) -> None:
        record.on_scored(n, evaluator.evaluate(cell.cfg, weights, n, cfg.heldout,
                                               cfg.capability))

    progress = Progress(f"stream {cell.name}", {cell.name: cfg.num_edits}, log=log)
    for event in editor.run(None):
        record.on_event(event, score, progress)
    progress.finish(cell.name)
    return record.finish()
