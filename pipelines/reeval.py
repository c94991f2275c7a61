"""Re-evaluate logged snapshots: retention of the first k edits (and the capability suite)
on every weight snapshot of edit-stream runs, logged back to those runs.

    python -m pipelines.reeval --experiment rlsedit-grid --first-k 100
    python -m pipelines.reeval --run-id RUN [--run-id RUN ...] --capability cpu

A run qualifies when it has `config.json` and weight snapshots as artifacts (grid cells:
`snapshots/edits-N.safetensors`; `pipelines.edit_stream` runs: `edited_layers.safetensors`,
the snapshot after all edits). For each snapshot (step N = edits applied) it logs
`reeval.first<k>.<metric>` at step N and, with a capability suite, `cap.<task>.<metric>`
for the tasks the run has no score of at N. The unedited references go to step 0
(`unedited_reeval.first<k>.*`, `unedited_cap.*`). Nothing logged before is changed: what
is there is skipped, so a second call adds nothing and an interrupted call resumes where
it stopped. Scores on Ray (evaluator actors per model, results logged as they land) or,
with `--no-ray`, in this process. One re-evaluation at a time per tracking store (a second
is refused, naming the first), so a scheduler needs no lock of its own. Scheduling it:
cluster/README.md.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.driver import (Flag, config_parser, join_ray, one_line_errors, read_config,
                              setup_logging)
from pipelines.tracking import check_tracking, log_metrics, open_tracking, tracking_store
from tasks.config import ConfigError, from_dict, to_dict
from tasks.errors import UserError
from tasks.evaluate.capability import CapabilityArgs, resolve_suite
from tasks.files import workdir_path
from tasks.lock import lock_file, machine_lock_path
from tasks.progress import Progress

log = logging.getLogger("rlsedit.reeval")

SNAPSHOT = re.compile(r"^snapshots/edits-(\d+)\.safetensors$")
FINAL_WEIGHTS = "edited_layers.safetensors"


@dataclass
class ReevalConfig:
    experiment: str | None = None        # every qualifying run of this MLflow experiment
    run_ids: list[str] | None = None     # or exactly these runs
    last_only: bool = False              # only each run's latest snapshot
    first_k: int = 100                   # retention = metrics of the first k edits
    capability: CapabilityArgs = field(default_factory=CapabilityArgs)
    use_ray: bool = True
    evaluators_per_model: int = 1
    evaluator_cpus: float = 1.0
    ray_address: str | None = None


@dataclass
class Job:
    """One snapshot of one run and what it still lacks."""

    run_id: str
    run_name: str
    model: str
    stream: dict          # the run's stream config (config.json)
    artifact: str         # the snapshot's path among the run's artifacts
    step: int             # edits applied
    retention: bool       # reeval.first<k>.* missing at `step`
    tasks: list[str]      # capability tasks with no score at `step`


def _steps(client, run_id: str, key: str | None) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)} if key else set()


def _get_run(client, run_id: str):
    """MLflow run `run_id`; a UserError when this tracking store does not have it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"no MLflow run {run_id} in the tracking store {tracking_store()}: "
                        f"check the run id, or set MLFLOW_TRACKING_URI to its store") from None


def find_runs(client, cfg: ReevalConfig) -> list:
    if cfg.run_ids:
        return [_get_run(client, run_id) for run_id in cfg.run_ids]
    if not cfg.experiment:
        raise ConfigError("give an experiment (--experiment) or run ids (--run-id)")
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        raise ConfigError(f"no MLflow experiment named {cfg.experiment!r} in this tracking "
                         f"store (MLFLOW_TRACKING_URI)")
    return client.search_runs([experiment.experiment_id], max_results=50_000)


def plan(client, cfg: ReevalConfig, tasks: list[str]) -> list[Job]:
    """Every (run, snapshot) that lacks the retention or a capability score, by step."""
    jobs = []
    for run in find_runs(client, cfg):
        run_id = run.info.run_id
        top = {a.path for a in client.list_artifacts(run_id)}
        if "config.json" not in top:
            continue
        snapshots = {}
        if "snapshots" in top:
            for artifact in client.list_artifacts(run_id, "snapshots"):
                match = SNAPSHOT.match(artifact.path)
                if match:
                    snapshots[int(match.group(1))] = artifact.path
        if not snapshots and FINAL_WEIGHTS not in top:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            stream = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp))
                                .read_text())
        stream.pop("editor_settings", None)
        stream["data"] = workdir_path(stream["data"])   # an edit_stream run may log it relative
        if FINAL_WEIGHTS in top:
            snapshots.setdefault(int(stream["num_edits"]), FINAL_WEIGHTS)
        scored = _steps(client, run_id, f"reeval.first{cfg.first_k}.efficacy")
        task_steps = {t: _steps(client, run_id, next(
            (k for k in run.data.metrics if k.startswith(f"cap.{t}.")), None)) for t in tasks}
        steps = sorted(snapshots)[-1:] if cfg.last_only else sorted(snapshots)
        for step in steps:
            artifact = snapshots[step]
            job = Job(run_id, run.info.run_name, stream["model"], stream, artifact, step,
                      retention=step not in scored,
                      tasks=[t for t in tasks if step not in task_steps[t]])
            if job.retention or job.tasks:
                jobs.append(job)
    return jobs


def load_snapshot(client, job: Job) -> dict:
    """The snapshot's weights {parameter name: numpy array}."""
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as tmp:
        return load_file(client.download_artifacts(job.run_id, job.artifact, tmp))


class Evaluators:
    """`tasks.remote.actors.Evaluator`s per model: Ray actors, or plain objects in this process.
    `submit` starts a call, `next_result` returns one that has finished with the job it
    was for. Not Ray's `ActorPool`: its unordered results come back without the job they
    belong to, and one pool per model could not be waited on together."""

    def __init__(self, models: list[str], cfg: ReevalConfig):
        from tasks.remote.actors import Evaluator

        self.ray = None
        if cfg.use_ray:
            import ray

            if not ray.is_initialized():
                join_ray(cfg.ray_address)
            self.ray = ray
            actor = ray.remote(Evaluator).options(num_cpus=cfg.evaluator_cpus)
            self.pool = {m: [actor.remote(m) for _ in range(cfg.evaluators_per_model)]
                         for m in models}
        else:
            self.pool = {m: [Evaluator(m)] for m in models}
        self.turn = 0
        self.pending: dict = {}

    def call(self, model: str, method: str, *args):
        """Run `method` on the model's first evaluator and wait for it."""
        target = getattr(self.pool[model][0], method)
        return self.ray.get(target.remote(*args)) if self.ray else target(*args)

    def submit(self, model: str, tag, method: str, *args) -> None:
        evaluators = self.pool[model]
        self.turn += 1
        target = getattr(evaluators[self.turn % len(evaluators)], method)
        if self.ray:
            self.pending[target.remote(*args)] = tag
        else:
            self.pending[self.turn] = (tag, target(*args))

    def next_result(self):
        """(tag, value) of a finished call (the first to finish, on Ray)."""
        if not self.ray:
            return self.pending.pop(next(iter(self.pending)))
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        return self.pending.pop(ready[0]), self.ray.get(ready[0])

    def close(self) -> None:
        if self.ray:
            for handles in self.pool.values():
                for handle in handles:
                    self.ray.kill(handle)


def log_references(client, evaluators: Evaluators, job: Job, cfg: ReevalConfig) -> None:
    """Step-0 unedited references on the run, each logged once: the base model's scores on
    the first k edits and the capability suite's unedited scores."""
    have = client.get_run(job.run_id).data.metrics
    metrics = {}
    key = f"unedited_reeval.first{cfg.first_k}.efficacy"
    if job.retention and key not in have:
        base = evaluators.call(job.model, "rescore", job.stream, {}, cfg.first_k, cfg.first_k,
                               None)
        metrics.update({f"unedited_{k}": v for k, v in base.items()})
    if job.tasks:
        base = evaluators.call(job.model, "capability_baseline", to_dict(cfg.capability))
        metrics.update({f"unedited_{k}": v for k, v in base.items()
                        if f"unedited_{k}" not in have})
    log_metrics(client, job.run_id, metrics, 0)


def run_labels(jobs: list[Job]) -> dict[str, str]:
    """{run id: the name its progress shows}: the run name, with the id's start when two
    runs share a name."""
    names = {job.run_id: job.run_name for job in jobs}
    uses = Counter(names.values())
    return {run_id: f"{name} ({run_id[:8]})" if uses[name] > 1 else name
            for run_id, name in names.items()}


def job_progress(jobs: list[Job]) -> tuple[Progress, dict[str, str]]:
    """Progress over the runs, counted in snapshots, and each run's label in it."""
    labels = run_labels(jobs)
    totals = {label: 0 for label in labels.values()}
    for job in jobs:
        totals[labels[job.run_id]] += 1
    return Progress("reeval", totals, unit="snapshots", items="runs", log=log), labels


def lock_path(store: str) -> Path:
    """The lock that keeps re-evaluations of tracking store `store` one at a time."""
    return machine_lock_path("reeval", store)


def run_reeval(cfg: ReevalConfig, max_in_flight: int = 4) -> dict:
    """Score and log every missing (run, snapshot); returns {"scored": [...]}. A second
    re-evaluation of the same tracking store while this one runs is refused."""
    check_tracking()
    store = tracking_store()
    with lock_file(lock_path(store), f"re-evaluation of {store}"):
        return _run_locked(cfg, max_in_flight)


def _run_locked(cfg: ReevalConfig, max_in_flight: int) -> dict:
    from mlflow import MlflowClient

    open_tracking()
    client = MlflowClient()
    tasks = resolve_suite(cfg.capability)[0] if cfg.capability.enabled else []
    jobs = plan(client, cfg, tasks)
    log.info("%d snapshot(s) to score", len(jobs))
    scored = []
    if not jobs:
        return {"scored": scored}
    progress, labels = job_progress(jobs)
    evaluators = Evaluators(sorted({job.model for job in jobs}), cfg)
    progress.report(force=True)
    try:
        for run_id in dict.fromkeys(job.run_id for job in jobs):
            log_references(client, evaluators, next(j for j in jobs if j.run_id == run_id), cfg)
        queue = list(jobs)
        while queue or evaluators.pending:
            while queue and len(evaluators.pending) < max_in_flight:  # bounded snapshot memory
                job = queue.pop(0)
                suite = {**to_dict(cfg.capability), "tasks": job.tasks} if job.tasks else None
                evaluators.submit(job.model, job, "rescore", job.stream,
                                  load_snapshot(client, job), job.step,
                                  cfg.first_k if job.retention else None, suite)
            job, metrics = evaluators.next_result()
            log_metrics(client, job.run_id, metrics, job.step)
            scored.append({"run": job.run_name, "step": job.step, **metrics})
            log.info("%s at %d edits: %s", job.run_name, job.step,
                     ", ".join(f"{k} {v:.3f}" for k, v in list(metrics.items())[:3]))
            label = labels[job.run_id]
            progress.update(label, progress.done[label] + 1)
            if progress.done[label] == progress.totals[label]:
                progress.finish(label)
    finally:
        evaluators.close()
    return {"scored": scored}


FLAGS = (Flag("experiment", "experiment"),
         Flag("run_id", "run_ids", "a run to re-evaluate (repeatable)", repeat=True),
         Flag("first_k", "first_k"),
         Flag("capability", "capability.profile", "also score this suite (cpu, full)"),
         Flag("last_only", "last_only", "only each run's latest snapshot", switch="true"),
         Flag("no_ray", "use_ray", "score in this process", switch="false"))


def parse_args(argv=None) -> ReevalConfig:
    parser = config_parser("pipelines.reeval", __doc__, FLAGS,
                           config_help="a ReevalConfig YAML (optional)")
    cfg = from_dict(ReevalConfig, read_config(parser.parse_args(argv), FLAGS))
    if cfg.first_k < 1:
        raise ConfigError(f"first_k must be at least 1, got {cfg.first_k}")
    resolve_suite(cfg.capability)   # an unknown profile or task fails before any work
    return cfg


def main(argv=None) -> None:
    setup_logging()
    tic = time.perf_counter()
    with one_line_errors(argv):
        result = run_reeval(parse_args(argv))
    print(f"re-evaluated {len(result['scored'])} snapshot(s) in "
          f"{time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
