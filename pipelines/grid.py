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
folder; a re-run must use the tracking store the grid's runs live in (`pipelines/tracking.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.cell import Cell, CellRecord, open_cell_run, save_json
from pipelines.driver import (Flag, check_ray, config_parser, join_ray, one_line_errors,
                              read_config, setup_logging)
from pipelines.report import comparison_table, write_reports
from pipelines.tracking import Tracker, check_store, check_tracking, how_to_open, tracking_store
from tasks.anchor import AnchorArgs
from tasks.config import ConfigError, from_dict, to_dict
from tasks.corpus import HeldoutArgs
from tasks.editors import resolve_editor
from tasks.errors import UserError
from tasks.evaluate.capability import CapabilityArgs, resolve_suite
from tasks.evaluate.neighbours import NeighbourArgs
from tasks.files import workdir_path
from tasks.lock import folder_lock
from tasks.models import ensure_dequantised, resolve_spec
from tasks.preflight import check_output, check_stream
from tasks.progress import PROGRESS_SECONDS, Progress, timed
from tasks.storage import Location
from tasks.stream import StreamConfig

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
                          "experiment": cfg.experiment, "heldout": to_dict(cfg.heldout),
                          "capability": to_dict(cfg.capability)}
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


def editor_actor_name(parent_run_id: str, cell: Cell) -> str:
    """The Ray name of a cell's editor actor (`ray list actors`), unique per grid run."""
    return f"editor:{parent_run_id[:12]}:{cell.name}"


class GridLogger:
    """The grid's MLflow runs: a parent, and a child per cell created on first use."""

    def __init__(self, cfg: GridConfig, state: dict):
        self.cfg = cfg
        self.state = state
        self.tracker = Tracker(cfg.experiment)
        self.client = self.tracker.client
        if state.get("parent") is None:
            state["parent"] = self.tracker.new_run(cfg.name, to_dict(cfg),
                                                   config_file="grid_config.json")
            state["tracking_store"] = tracking_store()
        self.parent = state["parent"]

    def child(self, cell: Cell, baseline: dict) -> str:
        children = self.state.setdefault("children", {})
        if cell.name not in children:
            children[cell.name] = open_cell_run(self.tracker, cell, baseline, self.parent)
        return children[cell.name]

    def metrics(self, run_id: str, metrics: dict, step: int) -> None:
        self.tracker.metrics(run_id, metrics, step)

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
    """Before anything is written: every cell's inputs (`tasks.preflight.check_stream`:
    its evaluator's held-out corpus and capability data too), the output folder, the
    tracking store and the Ray cluster to join; a UserError says what to do."""
    import ray

    checked = set()
    for cell in cells:
        check_stream(from_dict(StreamConfig, cell.cfg), device_here=False, checked=checked)
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
        return GridRun(cfg, cells).run()


class GridRun:
    """One run of a grid on Ray: per model the anchor statistics, evaluators and unedited
    scores; an editor actor per unfinished cell; then each event (an editor's, an
    evaluator's scores) handed to its cell's `CellRecord` until every cell is done.

    Evaluators are called by hand, not through Ray's `ActorPool`: a cell keeps one
    evaluator (whose cache holds that cell's requests) and the loop waits on the editors'
    generators and the evaluations together in one `ray.wait`, where an ActorPool waits on
    its own results only."""

    def __init__(self, cfg: GridConfig, cells: list[Cell]):
        self.cfg, self.cells, self.out = cfg, cells, cfg.out_dir
        self.state_path = self.out / "grid_state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        check_store(self.state, self.state.get("parent"), self.out)
        self.evaluators, self.baselines, self.anchors = {}, {}, {}
        self.summaries: dict[str, dict] = {}
        self.records: dict[str, CellRecord] = {}
        self.actors, self.generators, self.evals = {}, {}, {}
        self.evaluator_of, self.failed_calls = {}, {}

    def run(self) -> dict:
        self._join()
        self.logger = GridLogger(self.cfg, self.state)
        save_json(self.state_path, self.state)
        for model in self.cfg.models:
            self._prepare(model)
        for i, cell in enumerate(self.cells):
            self._start(i, cell)
        self.progress = Progress(f"grid {self.cfg.name}",
                                 {c.name: c.cfg["num_edits"] for c in self.cells}, log=log)
        for name in self.summaries:
            self.progress.found_done(name)
        self.progress.report(force=True)
        while self.generators or self.evals:
            self._next_event()
        return self._close()

    def _join(self) -> None:
        """Join the cluster; the actor classes with the resources the config gives them."""
        import ray

        from tasks.remote.actors import EditorActor, Evaluator

        if not ray.is_initialized():
            join_ray(self.cfg.ray_address)
        resources = ray.cluster_resources()
        use_gpu, res = resources.get("GPU", 0) >= 1, self.cfg.resources
        check_cpus(self.cfg, resources.get("CPU", 0))
        self.editor_actor = ray.remote(EditorActor)
        self.editor_options = {"num_cpus": res.editor_cpus, "num_gpus": 1 if use_gpu else 0,
                               "max_restarts": res.editor_max_restarts}
        self.evaluator_actor = ray.remote(Evaluator).options(
            num_cpus=res.evaluator_cpus, num_gpus=res.evaluator_gpus if use_gpu else 0,
            max_restarts=res.evaluator_max_restarts,
            max_task_retries=res.evaluator_max_restarts)
        self.use_gpu = use_gpu

    def _prepare(self, model: str) -> None:
        """`model`'s anchor statistics (Ray tasks over corpus shards), evaluators and
        unedited scores."""
        import ray

        from tasks.remote.anchor_ray import ray_anchor_stats

        ensure_dequantised(model)   # here, where its log is seen, not in every Ray worker
        layers = _edit_layers(model, self.cells)
        anchor_args = from_dict(AnchorArgs, self.cfg.stream.get("anchor", {}))
        with timed(log, f"anchor statistics of {model}, layers {layers}"):
            stats = ray_anchor_stats(model, layers, anchor_args, self.cfg.resources.anchor_shards,
                                     self.use_gpu)
        self.anchors[model] = ray.put({l: (s.cov.numpy(), s.count) for l, s in stats.items()})
        self.logger.tracker.dict(self.logger.parent, {
            str(l): {"tokens": s.count, "trace": float(s.cov.trace())} for l, s in stats.items()},
            f"anchor/{model.replace('/', '_')}.json")
        self.evaluators[model] = [self.evaluator_actor.remote(model)
                                  for _ in range(self.cfg.resources.evaluators_per_model)]
        first = next(c for c in self.cells if c.model == model)
        with timed(log, f"evaluator start-up and unedited scores of {model} "
                        f"({first.cfg['num_edits']} edit requests, cached after the first run)"):
            self.baselines[model] = ray.get(self.evaluators[model][0].baseline.remote(
                first.cfg, first.cfg["heldout"], first.cfg["capability"]))

    def _start(self, i: int, cell: Cell) -> None:
        """Read a finished cell back; start the editor actor of any other."""
        summary_path = cell.dir / "summary.json"
        if summary_path.exists():
            self.summaries[cell.name] = json.loads(summary_path.read_text())
            return
        run_id = self.logger.child(cell, self.baselines[cell.model])
        save_json(self.state_path, self.state)
        evaluators = self.evaluators[cell.model]
        self.evaluator_of[cell.name] = evaluators[i % len(evaluators)]
        self.actors[cell.name] = self.editor_actor.options(
            **self.editor_options, name=editor_actor_name(self.logger.parent, cell)).remote(
            cell.cfg, self.baselines[cell.model])
        self._call_editor(cell)
        self.records[cell.name] = CellRecord(cell, self.logger.tracker, run_id,
                                             self.baselines[cell.model])
        self.failed_calls[cell.name] = 0

    def _call_editor(self, cell: Cell) -> None:
        self.generators[self.actors[cell.name].run.remote(self.anchors[cell.model])] = cell

    def _next_event(self) -> None:
        import ray

        ready, _ = ray.wait(list(self.generators) + list(self.evals), num_returns=1,
                            timeout=PROGRESS_SECONDS)
        if not ready:   # a long evaluation: say where the grid stands all the same
            self.progress.report()
        elif ready[0] in self.evals:
            self._on_scored(ready[0])
        else:
            self._on_editor(ready[0])

    def _score(self, cell: Cell, n: int, snapshot: dict) -> None:
        """Hand the snapshot after `n` edits to the cell's evaluator."""
        scored = self.evaluator_of[cell.name].evaluate.remote(
            cell.cfg, snapshot, n, cell.cfg["heldout"], cell.cfg["capability"])
        self.evals[scored] = (cell, n)

    def _on_scored(self, item) -> None:
        import ray

        cell, n = self.evals.pop(item)
        self.records[cell.name].on_scored(n, ray.get(item))
        if self.records[cell.name].finished:
            self._finish(cell)

    def _on_editor(self, item) -> None:
        import ray

        cell = self.generators[item]
        try:
            event = ray.get(next(item))
        except (ray.exceptions.RayActorError, StopIteration) as err:
            self._call_again(cell, item, err)
            return
        self.failed_calls[cell.name] = 0
        record = self.records[cell.name]
        record.on_event(event, lambda n, snapshot: self._score(cell, n, snapshot),
                        self.progress)
        if event.get("done"):
            del self.generators[item]
            if record.finished:
                self._finish(cell)

    def _call_again(self, cell: Cell, item, err: Exception) -> None:
        """The cell's editor actor died or is being restarted by Ray (it reloads its
        checkpoint): ask its stream to go on, a few times before giving up."""
        del self.generators[item]
        self.failed_calls[cell.name] += 1
        if self.failed_calls[cell.name] > ACTOR_RETRIES:
            raise RuntimeError(f"the editor actor of {cell.name} is gone ({err}); re-run the "
                               f"grid command to resume from its checkpoint") from err
        log.warning("%s: editor actor unavailable (%s); calling it again from its checkpoint",
                    cell.name, type(err).__name__)
        time.sleep(ACTOR_RETRY_SECONDS)
        self._call_editor(cell)

    def _finish(self, cell: Cell) -> None:
        import ray

        summary = self.records.pop(cell.name).finish()
        self.logger.cell_on_parent(cell, summary["history"])
        self.summaries[cell.name] = summary
        ray.kill(self.actors.pop(cell.name))
        self.progress.finish(cell.name)

    def _close(self) -> dict:
        """Evaluators stopped; the comparison table, reports and summary written and
        logged on the parent run; the grid's result."""
        import ray

        for handles in self.evaluators.values():
            for handle in handles:
                ray.kill(handle)
        cfg, cells, summaries, logger = self.cfg, self.cells, self.summaries, self.logger
        table = "\n\n".join(f"{model}:\n\n" + comparison_table(
            {c.name: summaries[c.name] for c in cells if c.model == model})
            for model in cfg.models)
        grid_reports(cfg, cells, summaries, logger)
        (self.out / "comparison.md").write_text(table + "\n")
        logger.client.log_text(logger.parent, table, "comparison.md")
        logger.final_table(cells, summaries)
        result = {"grid": cfg.name, "parent_run_id": logger.parent, "table": table,
                  "cells": {c.name: summaries[c.name] for c in cells}, "config": to_dict(cfg)}
        logger.tracker.dict(logger.parent, result, "grid_summary.json")
        logger.tracker.end(logger.parent)
        save_json(self.out / "grid_summary.json", result)
        if cfg.output_json:
            save_json(Location(cfg.output_json), result)
        return result


FLAGS = (Flag("output_json", "output_json", "write the summary table and cells here"),)


def parse_args(argv=None) -> GridConfig:
    parser = config_parser("pipelines.grid", __doc__, FLAGS,
                           config_help="grid YAML (pipelines/configs/)", config_required=True)
    return resolve_paths(from_dict(GridConfig, read_config(parser.parse_args(argv), FLAGS)))


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
