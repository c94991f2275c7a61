"""Model × editor × seed grids on Ray, logged to MLflow.

    python -m pipelines.grid --config pipelines/configs/smoke.yaml
    ray job submit --working-dir . -- python -m pipelines.grid --config pipelines/configs/cpu-demo.yaml

Per model, Ray tasks compute the anchor statistics over corpus shards (cached on disk)
and evaluator actors load the base model once. Each cell gets an editor actor (a GPU when
the cluster has one) that streams its edits and publishes weight snapshots; evaluators
score the snapshots while editing goes on. MLflow: one parent run for the grid, one child
run per cell (params, metrics at step = edits applied, snapshots, summary), the comparison
table and plot on the parent.

A crash costs at most `stream.checkpoint_minutes` of editing. An editor actor that dies is
restarted by Ray (`resources.editor_max_restarts`) and goes on from its checkpoint inside
the job; an evaluator that dies is restarted and its call retried. Re-running the same
command after the driver died resumes: finished cells are read back, half-finished ones
continue from their checkpoint, and evaluation points whose scores were lost are scored
from the snapshots the editor wrote before each checkpoint. The final weights equal those
of an uninterrupted run (tests/pipelines/test_resume.py). One driver at a time per output
folder; a re-run must use the tracking store the grid's runs live in (`pipelines/driver.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.driver import (argument_parser, check_ray, check_store, check_tracking,
                              how_to_open, join_ray, log_file, one_line_errors,
                              open_tracking, setup_logging, tracking_store)
from pipelines.report import comparison_table, write_reports
from tasks.actors import HeldoutArgs
from tasks.anchor import AnchorArgs
from tasks.capability import CapabilityArgs, resolve_suite
from tasks.config import ConfigError, flatten, from_dict, load_yaml, set_override, to_dict
from tasks.editors import resolve_editor
from tasks.errors import UserError
from tasks.files import workdir_path
from tasks.lock import folder_lock
from tasks.models import ensure_dequantised, resolve_spec
from tasks.neighbours import NeighbourArgs
from tasks.preflight import check_file, check_output, check_stream
from tasks.progress import PROGRESS_SECONDS, Progress, timed
from tasks.storage import Location
from tasks.stream import StreamConfig, snapshot_path

log = logging.getLogger("rlsedit.grid")
ACTOR_RETRIES, ACTOR_RETRY_SECONDS = 30, 2.0   # calls to an editor actor Ray is restarting
# Each cell's curves of these go on the parent run too, as `<metric>/<label>` (`short_label`:
# the chart titles are narrow): MLflow's chart
# view shows the parent's charts without expanding it, a section per metric, sections in
# name order (the anchor deviation, which would come first, stays on the cells' runs)
PARENT_METRICS = ("efficacy", "generalization", "specificity", "specificity_nbhd",
                  "retention_efficacy", "perplexity")
TABLE_METRICS = PARENT_METRICS + ("anchor_deviation", "fluency")   # the parent's final table


@dataclass
class ResourceArgs:
    editor_cpus: float = 1.0         # per editor actor (= its torch threads)
    evaluator_cpus: float = 0.5      # per evaluator actor
    evaluator_gpus: float = 0.25     # per evaluator, when the cluster has GPUs
    evaluators_per_model: int = 1
    anchor_shards: int = 2           # Ray tasks over the anchor corpus
    editor_max_restarts: int = 3     # an editor actor that dies goes on from its checkpoint
    evaluator_max_restarts: int = 3  # an evaluator that dies is restarted, its call retried


@dataclass
class GridConfig:
    name: str = "grid"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    editors: list[str] = field(default_factory=lambda: ["rlsedit"])
    seeds: list[int] = field(default_factory=lambda: [0])
    stream: dict = field(default_factory=dict)       # StreamConfig keys shared by all cells
    editor_args: dict = field(default_factory=dict)  # {editor name: settings overrides}
    variants: dict = field(default_factory=dict)     # {name: {editor, editor_args, stream}}:
    # a named setting of an editor for sweeps, listed in `editors` like an editor; its
    # `stream` keys (e.g. layers, values.lr, keys.mode) override the grid's `stream`
    heldout: HeldoutArgs = field(default_factory=HeldoutArgs)
    capability: CapabilityArgs = field(default_factory=CapabilityArgs)  # lm-eval suite per snapshot
    resources: ResourceArgs = field(default_factory=ResourceArgs)
    output_dir: str | None = None    # default runs/grid-<name>; or s3://, gs://: tasks/storage.py
    output_json: str | None = None
    experiment: str = "rlsedit-grid"
    ray_address: str | None = None   # None: RAY_ADDRESS, a running `ray start`, or a new local one

    @property
    def out_dir(self) -> Location:
        return Location(self.output_dir or Path("runs") / f"grid-{self.name}").resolve()


@dataclass
class Cell:
    name: str
    model: str
    editor: str
    cfg: dict          # StreamConfig as a dict
    dir: Location


def resolve_paths(cfg: GridConfig) -> GridConfig:
    """Relative data and output paths made absolute (`workdir_path`: against
    $RLSEDIT_WORKDIR under `ray job submit`), so every actor reads the same files."""
    fix = workdir_path
    stream = dict(cfg.stream)
    stream["data"] = fix(stream.get("data", StreamConfig.data))
    stream["anchor"] = {**stream.get("anchor", {})}
    stream["anchor"]["corpus"] = fix(stream["anchor"].get("corpus", AnchorArgs.corpus))
    stream["neighbours"] = {**stream.get("neighbours", {})}
    pool = stream["neighbours"].get("pool", NeighbourArgs.pool)
    stream["neighbours"]["pool"] = fix(pool) if pool else ""
    cfg.stream = stream
    cfg.heldout.corpus = fix(cfg.heldout.corpus)
    cfg.capability.data_dir = fix(cfg.capability.data_dir)
    cfg.output_dir = fix(cfg.output_dir or f"runs/grid-{cfg.name}")
    cfg.output_json = fix(cfg.output_json)
    return cfg


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s keys, sections (dicts) merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def cell_setting(cfg: GridConfig, label: str) -> dict:
    """The stream keys of `label` in `editors`: a registry editor, or a variant of one."""
    variant = dict(cfg.variants.get(label, {"editor": label}))
    unknown = sorted(set(variant) - {"editor", "editor_args", "stream"})
    if unknown or "editor" not in variant:
        raise ConfigError(f"variant {label!r} needs `editor` and may set `editor_args` and "
                         f"`stream`, got {sorted(variant)}")
    editor = variant["editor"]
    editor_args = {**cfg.editor_args.get(editor, {}), **variant.get("editor_args", {})}
    resolve_editor(editor, editor_args)
    return merge({**cfg.stream, "editor": editor, "editor_args": editor_args},
                 variant.get("stream", {}))


def grid_cells(cfg: GridConfig) -> list[Cell]:
    """Every model × editor (or variant) × seed, each with its validated stream config."""
    for editor in cfg.editor_args:   # a typo here would silently drop the settings
        resolve_editor(editor, cfg.editor_args[editor])
    resolve_suite(cfg.capability)    # an unknown profile or local task fails here
    cells = []
    for model in cfg.models:
        resolve_spec(model)
        for label in cfg.editors:
            setting = cell_setting(cfg, label)
            for seed in cfg.seeds:
                name = f"{model.replace('/', '_')}-{label}-s{seed}"
                cell_dir = cfg.out_dir / "cells" / name
                stream = {**setting, "model": model, "seed": seed,
                          "output_dir": str(cell_dir), "run_name": name,
                          "experiment": cfg.experiment}
                stream = to_dict(from_dict(StreamConfig, stream, where="stream."))
                cells.append(Cell(name, model, label, stream, cell_dir))
    return cells


def short_label(cell: Cell, cfg: GridConfig) -> str:
    """The cell's name without what every cell of the grid shares (its one model, its one
    seed): `rlsedit`, `smollm2-135m-rlsedit`, `rlsedit-s1`."""
    parts = [cell.model.replace("/", "_")] if len(cfg.models) > 1 else []
    parts.append(cell.editor)
    if len(cfg.seeds) > 1:
        parts.append(f"s{cell.cfg['seed']}")
    return "-".join(parts)


def _edit_layers(model: str, cells: list[Cell]) -> list[int]:
    """Every layer some cell of `model` edits (the anchor statistics cover them all)."""
    layers = set()
    for cell in cells:
        if cell.model == model:
            layers.update(cell.cfg.get("layers") or resolve_spec(model).edit_layers)
    if not layers:
        raise ConfigError(f"model {model!r} has no default edit layers: set stream.layers")
    return sorted(layers)


def _save_json(path: Location, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def _load_weights(path: Location) -> dict:
    from safetensors.torch import load_file

    with path.local_copy() as local:
        return {k: v.numpy() for k, v in load_file(str(local)).items()}


def _save_weights(path: Location, weights: dict) -> Location:
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    path.write_with(lambda tmp: save_file(tensors, str(tmp)))
    return path


def editor_actor_name(parent_run_id: str, cell: Cell) -> str:
    """The Ray name of a cell's editor actor (`ray list actors`), unique per grid run."""
    return f"editor:{parent_run_id[:12]}:{cell.name}"


def log_metrics(client, run_id: str, metrics: dict, step: int) -> None:
    """The numeric entries of `metrics` as one MLflow batch at `step`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    if batch:
        client.log_batch(run_id, metrics=batch)


class GridLogger:
    """The grid's MLflow runs: a parent, and a child per cell created on first use."""

    def __init__(self, cfg: GridConfig, state: dict):
        from mlflow import MlflowClient

        self.cfg = cfg
        self.state = state
        self.experiment_id = open_tracking(cfg.experiment).experiment_id
        self.client = MlflowClient()
        if state.get("parent") is None:
            run = self.client.create_run(self.experiment_id, run_name=cfg.name)
            state["parent"] = run.info.run_id
            state["tracking_store"] = tracking_store()
            for key, value in flatten(to_dict(cfg)).items():
                self.client.log_param(state["parent"], key, str(value)[:6000])
            self.client.log_dict(state["parent"], to_dict(cfg), "grid_config.json")
        self.parent = state["parent"]

    def child(self, cell: Cell, editor_settings: dict, baseline: dict) -> str:
        children = self.state.setdefault("children", {})
        if cell.name not in children:
            run = self.client.create_run(self.experiment_id, run_name=cell.name,
                                         tags={"mlflow.parentRunId": self.parent})
            run_id = children[cell.name] = run.info.run_id
            for key, value in {**flatten(cell.cfg), **flatten(editor_settings, "editor.")}.items():
                self.client.log_param(run_id, key, str(value)[:6000])
            self.client.log_dict(run_id, {**cell.cfg, "editor_settings": editor_settings},
                                 "config.json")
            self.metrics(run_id, {f"unedited_{k}": v for k, v in baseline.items()}, 0)
        return children[cell.name]

    def metrics(self, run_id: str, metrics: dict, step: int) -> None:
        log_metrics(self.client, run_id, metrics, step)

    def cell_on_parent(self, cell: Cell, history: list[dict]) -> None:
        """The cell's PARENT_METRICS at every evaluation point, on the parent run."""
        label = short_label(cell, self.cfg)
        for record in history:
            self.metrics(self.parent, {f"{k}/{label}": record[k] for k in PARENT_METRICS
                                       if k in record}, record["edits"])

    def final_table(self, cells: list[Cell], summaries: dict[str, dict]) -> None:
        """One row per cell (model, editor, seed, final TABLE_METRICS), a table artifact
        of the parent run."""
        rows = [{"cell": c.name, "model": c.model, "editor": c.editor, "seed": c.cfg["seed"],
                 **{k: summaries[c.name]["final"].get(k) for k in TABLE_METRICS}}
                for c in cells]
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        self.client.log_table(self.parent, columns, "final_metrics.json")


def grid_reports(cfg: GridConfig, cells: list[Cell], summaries: dict[str, dict],
                 logger: GridLogger) -> None:
    """Each model's reports (`write_reports`; each model has its own unedited reference) in
    the grid's output folder and under `reports/` on the parent run."""
    with cfg.out_dir.staging() as folder:
        for model in cfg.models:
            cell_summaries = {c.editor + (f" s{c.cfg['seed']}" if len(cfg.seeds) > 1 else ""):
                              summaries[c.name] for c in cells if c.model == model}
            files = write_reports(cell_summaries, folder, model.replace("/", "_"),
                                  f"grid {cfg.name}: {model}, {cfg.stream.get('num_edits')} edits")
            for path in files.values():
                logger.client.log_artifact(logger.parent, str(path), "reports")


def check_inputs(cfg: GridConfig, cells: list[Cell]) -> None:
    """Before anything is written: every cell's inputs (`tasks.preflight.check_stream`),
    the held-out corpus, the capability data, the output folder, the tracking store and
    the Ray cluster to join; a UserError says what to do."""
    import ray

    checked = set()
    for cell in cells:
        check_stream(from_dict(StreamConfig, cell.cfg), device_here=False, checked=checked)
    check_file(cfg.heldout.corpus, "held-out corpus", "set heldout.corpus to a "
               "text<TAB>label file", checked)
    if cfg.capability.enabled and not Path(cfg.capability.data_dir).is_dir():
        raise UserError(f"capability.data_dir {cfg.capability.data_dir} is not a folder: set "
                        f"it to the folder holding the shared data (../shared/data)")
    check_output(cfg.out_dir)
    check_tracking()
    if not ray.is_initialized() and check_ray(cfg.ray_address) is None:
        check_cpus(cfg, os.cpu_count())   # the new local cluster will have them all


def check_cpus(cfg: GridConfig, cpus: float) -> None:
    """A UserError unless a cluster of `cpus` CPUs can hold the evaluators and an editor."""
    res = cfg.resources
    evaluator_cpus = res.evaluator_cpus * res.evaluators_per_model * len(cfg.models)
    if cpus - evaluator_cpus < res.editor_cpus:
        raise UserError(f"the cluster has {cpus} CPUs; evaluators take {evaluator_cpus} and "
                        f"an editor needs {res.editor_cpus}: lower resources.evaluator_cpus "
                        f"or resources.editor_cpus")


def run_grid(cfg: GridConfig) -> dict:
    """Run (or resume) the grid once its names, settings and inputs pass their checks; a
    second driver on the same output folder is refused."""
    cells = grid_cells(cfg)
    check_inputs(cfg, cells)
    with folder_lock(cfg.out_dir):
        return _run_locked(cfg, cells)


def _run_locked(cfg: GridConfig, cells: list[Cell]) -> dict:
    import ray

    from tasks.actors import EditorActor, Evaluator
    from tasks.anchor_ray import ray_anchor_stats

    out = cfg.out_dir
    state_path = out / "grid_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    check_store(state, state.get("parent"), out)
    if not ray.is_initialized():
        join_ray(cfg.ray_address)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1
    res = cfg.resources
    check_cpus(cfg, resources.get("CPU", 0))
    logger = GridLogger(cfg, state)
    _save_json(state_path, state)

    evaluators, baselines, anchors = {}, {}, {}
    editor_actor = ray.remote(EditorActor)
    editor_options = {"num_cpus": res.editor_cpus, "num_gpus": 1 if use_gpu else 0,
                      "max_restarts": res.editor_max_restarts}
    evaluator_actor = ray.remote(Evaluator).options(
        num_cpus=res.evaluator_cpus, num_gpus=res.evaluator_gpus if use_gpu else 0,
        max_restarts=res.evaluator_max_restarts, max_task_retries=res.evaluator_max_restarts)
    anchor_args = from_dict(AnchorArgs, cfg.stream.get("anchor", {}))
    for model in cfg.models:
        ensure_dequantised(model)   # here, where its log is seen, not in every Ray worker
        layers = _edit_layers(model, cells)
        with timed(log, f"anchor statistics of {model}, layers {layers}"):
            stats = ray_anchor_stats(model, layers, anchor_args, res.anchor_shards, use_gpu)
        anchors[model] = ray.put({l: (s.cov.numpy(), s.count) for l, s in stats.items()})
        logger.client.log_dict(logger.parent, {str(l): {"tokens": s.count,
                                                        "trace": float(s.cov.trace())}
                                               for l, s in stats.items()},
                               f"anchor/{model.replace('/', '_')}.json")
        evaluators[model] = [evaluator_actor.remote(model) for _ in range(res.evaluators_per_model)]
        first = next(c for c in cells if c.model == model)
        with timed(log, f"evaluator start-up and unedited scores of {model}"):
            baselines[model] = ray.get(evaluators[model][0].baseline.remote(
                first.cfg, to_dict(cfg.heldout), to_dict(cfg.capability)))

    summaries: dict[str, dict] = {}
    generators, evals, actors, pending = {}, {}, {}, {}
    for i, cell in enumerate(cells):
        summary_path = cell.dir / "summary.json"
        if summary_path.exists():
            summaries[cell.name] = json.loads(summary_path.read_text())
            continue
        settings = resolve_editor(cell.cfg["editor"], cell.cfg["editor_args"])[2]
        run_id = logger.child(cell, settings, baselines[cell.model])
        _save_json(state_path, state)
        evaluator = evaluators[cell.model][i % len(evaluators[cell.model])]
        actor = editor_actor.options(**editor_options,
                                     name=editor_actor_name(logger.parent, cell)).remote(
            cell.cfg, baselines[cell.model])
        actors[cell.name] = actor
        generators[actor.run.remote(anchors[cell.model])] = cell
        results_path = cell.dir / "evals.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        pending[cell.name] = {"run_id": run_id, "results": results, "speed": {},
                              "scoring": set(), "done": None, "evaluator": evaluator,
                              "restarts": 0, "failed_calls": 0}
    progress = Progress(f"grid {cfg.name}", {c.name: c.cfg["num_edits"] for c in cells}, log=log)
    for name in summaries:
        progress.found_done(name)
    progress.report(force=True)

    def score(cell: Cell, n: int, snapshot: dict, speed: dict) -> None:
        """Hand the snapshot after `n` edits to the cell's evaluator; log its speed."""
        p = pending[cell.name]
        scored = p["evaluator"].evaluate.remote(cell.cfg, snapshot, n, to_dict(cfg.heldout),
                                                to_dict(cfg.capability))
        evals[scored] = (cell, n)
        p["scoring"].add(n)
        p["speed"][n] = speed = {k: v for k, v in speed.items() if k != "edits"}
        logger.metrics(p["run_id"], speed, n)

    def rescore_after_resume(cell: Cell, event: dict) -> None:
        """Score the evaluation points a crash left unscored, from the snapshots the editor
        wrote before each checkpoint."""
        p = pending[cell.name]
        for record in event["history"]:
            n = record["edits"]
            if str(n) in p["results"] or n in p["scoring"]:
                continue
            path = snapshot_path(cell.dir, n)
            if not path.exists():
                log.warning("%s: no snapshot after %d edits in %s; that evaluation point "
                            "stays empty", cell.name, n, cell.dir / "snapshots")
                continue
            log.info("%s: scoring the snapshot after %d edits left unscored", cell.name, n)
            log_file(p["run_id"], path, "snapshots")
            score(cell, n, _load_weights(path), record)

    def call_again(cell: Cell, item, err: Exception) -> None:
        """The cell's editor actor died or is being restarted by Ray (it reloads its
        checkpoint): ask its stream to go on, a few times before giving up."""
        p = pending[cell.name]
        del generators[item]
        p["failed_calls"] += 1
        if p["failed_calls"] > ACTOR_RETRIES:
            raise RuntimeError(f"the editor actor of {cell.name} is gone ({err}); re-run the "
                               f"grid command to resume from its checkpoint") from err
        log.warning("%s: editor actor unavailable (%s); calling it again from its checkpoint",
                    cell.name, type(err).__name__)
        time.sleep(ACTOR_RETRY_SECONDS)
        generators[actors[cell.name].run.remote(anchors[cell.model])] = cell

    def finish(cell: Cell) -> None:
        p = pending.pop(cell.name)
        summary = p["done"]
        history = []
        for n in sorted(int(k) for k in p["results"]):
            history.append({"edits": n, **p["results"][str(n)], **p["speed"].get(n, {})})
        summary["history"] = history
        summary["final"] = {**history[-1], **summary["final"]}
        summary["unedited"] = baselines[cell.model]
        summary["mlflow_run_id"] = p["run_id"]
        summary["editor_restarts"] = p["restarts"]
        scores_path = cell.dir / "final_scores.json"
        summary["final_scores"] = (json.loads(scores_path.read_text())
                                   if scores_path.exists() else None)
        _save_json(cell.dir / "summary.json", summary)
        logger.metrics(p["run_id"], {k: v for k, v in summary["final"].items()
                                     if k not in history[-1]}, summary["config"]["num_edits"])
        logger.metrics(p["run_id"], {"skipped_records": len(summary["skipped_records"]),
                                     "editor_restarts": p["restarts"]}, 0)
        logger.client.log_dict(p["run_id"], summary, "summary.json")
        logger.client.set_terminated(p["run_id"])
        logger.cell_on_parent(cell, history)
        summaries[cell.name] = summary
        ray.kill(actors.pop(cell.name))
        progress.finish(cell.name)

    while generators or evals:
        ready, _ = ray.wait(list(generators) + list(evals), num_returns=1,
                            timeout=PROGRESS_SECONDS)
        if not ready:   # a long evaluation: say where the grid stands all the same
            progress.report()
            continue
        item = ready[0]
        if item in evals:
            cell, n = evals.pop(item)
            p = pending[cell.name]
            p["results"][str(n)] = metrics = ray.get(item)
            if "per_request" in metrics:   # the final evaluation's scores per request
                _save_json(cell.dir / "final_scores.json", metrics.pop("per_request"))
            p["scoring"].discard(n)
            _save_json(cell.dir / "evals.json", p["results"])
            logger.metrics(p["run_id"], metrics, n)
            log.info("%s at %d edits: efficacy %.3f, retention %.3f", cell.name, n,
                     metrics["efficacy"], metrics["retention_efficacy"])
            if p["done"] is not None and not p["scoring"]:
                finish(cell)
            continue
        cell = generators[item]
        p = pending[cell.name]
        try:
            event = ray.get(next(item))
        except (ray.exceptions.RayActorError, StopIteration) as err:
            call_again(cell, item, err)
            continue
        p["failed_calls"] = 0
        if event.get("resumed"):
            if event["restarted"]:
                p["restarts"] += 1
                log.warning("%s: editor actor restarted by Ray, at edit %d", cell.name,
                            event["edits"])
            progress.resume(cell.name, event["edits"])
            rescore_after_resume(cell, event)
        elif event.get("progress"):
            progress.update(cell.name, event["edits"])
        elif event.get("done"):
            del generators[item]
            p["done"] = event["summary"]
            log_file(p["run_id"], _save_weights(cell.dir / "edited_layers.safetensors",
                                                event["edited"]))
            if not p["scoring"]:
                finish(cell)
        else:
            n = event["edits"]
            progress.update(cell.name, n)
            path = snapshot_path(cell.dir, n)
            if not path.exists():   # the editor runs on a node without this file system
                _save_weights(path, event["snapshot"])
            log_file(p["run_id"], path, "snapshots")
            score(cell, n, event["snapshot"], event["speed"])

    for handles in evaluators.values():
        for handle in handles:
            ray.kill(handle)
    ordered = {c.name: summaries[c.name] for c in cells}
    table = "\n\n".join(f"{model}:\n\n" + comparison_table(
        {c.name: summaries[c.name] for c in cells if c.model == model}) for model in cfg.models)
    grid_reports(cfg, cells, summaries, logger)
    (out / "comparison.md").write_text(table + "\n")
    logger.client.log_text(logger.parent, table, "comparison.md")
    logger.final_table(cells, summaries)
    result = {"grid": cfg.name, "parent_run_id": logger.parent, "table": table,
              "cells": ordered, "config": to_dict(cfg)}
    logger.client.log_dict(logger.parent, result, "grid_summary.json")
    logger.client.set_terminated(logger.parent)
    _save_json(out / "grid_summary.json", result)
    if cfg.output_json:
        _save_json(Location(cfg.output_json), result)
    return result


def parse_args(argv=None) -> GridConfig:
    parser = argument_parser("pipelines.grid", __doc__)
    parser.add_argument("--config", required=True, help="grid YAML (pipelines/configs/)")
    parser.add_argument("--output-json", help="write the summary table and cells here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a grid key, e.g. stream.num_edits=20 (repeatable)")
    args = parser.parse_args(argv)
    data = load_yaml(args.config)
    if args.output_json:
        data["output_json"] = args.output_json
    for assignment in args.set:
        set_override(data, assignment)
    return resolve_paths(from_dict(GridConfig, data))


def main(argv=None) -> None:
    setup_logging()
    tic = time.perf_counter()
    with one_line_errors(argv):
        result = run_grid(parse_args(argv))
    print(f"\n{result['table']}\n")
    print(f"grid {result['grid']} done in {time.perf_counter() - tic:.0f} s; "
          f"MLflow parent run {result['parent_run_id']}")
    print(how_to_open(result["parent_run_id"]))


if __name__ == "__main__":
    main()
