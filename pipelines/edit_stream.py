"""One edit stream, single process: a model, an editor, N CounterFact edits in order.

    python -m pipelines.edit_stream --model smollm2-135m --editor rlsedit \\
        --data ../shared/data/counterfact/counterfact-edit.json --num-edits 100 \\
        --batch-size 10 --eval-every 50 --output-json runs/summary.json
    python -m pipelines.edit_stream --config pipelines/configs/stream-demo.yaml --set editor_args.mu=0.1

Evaluates every `eval_every` edits (edits so far, at most `eval_max` of them, and the
first `retention_fraction` of the stream), logs to MLflow with step = edits applied,
checkpoints at each evaluation and every `checkpoint_minutes` (or `checkpoint_every`
edits; re-running the same command after a crash resumes there, with the same final
weights), and writes a JSON
summary: final metrics, retention, the unedited model's scores on the same prompts,
fluency, edits per second and the config. One driver at a time per output folder; a
resumed stream logs into the tracking store its run lives in (`pipelines/driver.py`).
"""

from __future__ import annotations

import json
import logging
import math

from tqdm.auto import tqdm

from pipelines.driver import (argument_parser, check_store, check_tracking, how_to_open,
                              log_file, one_line_errors, open_tracking, setup_logging,
                              tracking_store)
from tasks.config import flatten, from_dict, load_yaml, set_override, to_dict
from tasks.lock import folder_lock
from tasks.preflight import check_stream
from tasks.storage import Location
from tasks.stream import EditStream, StreamConfig, stream_fluency

log = logging.getLogger("rlsedit.stream")


def run_stream(cfg: StreamConfig) -> dict:
    """Run (or resume) the stream once its inputs and the tracking store pass their checks;
    a second driver on the same output folder is refused."""
    check_stream(cfg)
    check_tracking()
    with folder_lock(cfg.out_dir):
        return _run_locked(cfg)


def _run_locked(cfg: StreamConfig) -> dict:
    import mlflow

    stream = EditStream(cfg)
    check_store(stream.state, stream.state["run_id"], cfg.out_dir)
    baseline = stream.baseline()
    stream.checkpoint()

    open_tracking(cfg.experiment)
    with mlflow.start_run(run_id=stream.state["run_id"], run_name=cfg.name) as run:
        if stream.state["run_id"] is None:
            stream.state["run_id"] = run.info.run_id
            stream.state["tracking_store"] = tracking_store()
            mlflow.log_params(flatten(to_dict(cfg)))
            mlflow.log_params(flatten(stream.editor_settings, "editor."))
            mlflow.log_param("edit_layers", list(stream.layers))
            mlflow.log_dict({**to_dict(cfg), "editor_settings": stream.editor_settings},
                            "config.json")
            mlflow.log_dict({"templates": stream.state["templates"]}, "context_templates.json")
            mlflow.log_metrics({f"unedited_{k}": v for k, v in baseline.items()}, step=0)
            mlflow.log_metric("skipped_records", len(stream.skipped), step=0)
            if stream.skipped:
                mlflow.log_dict({"skipped": [vars(r) for r in stream.skipped]},
                                "skipped_records.json")
        progress = tqdm(total=cfg.num_edits, initial=stream.position, desc=f"{cfg.editor} edits",
                        unit="edit")
        while not stream.done:
            start = stream.position
            at_eval_point = stream.step()
            progress.update(stream.position - start)
            if at_eval_point:
                metrics = stream.evaluate()
                mlflow.log_metrics(metrics, step=stream.position)
                snapshot = stream.save_snapshot()   # for pipelines.reeval
                log_file(run.info.run_id, snapshot, "snapshots")
                progress.set_postfix(eff=f"{metrics['efficacy']:.2f}",
                                     ret=f"{metrics['retention_efficacy']:.2f}")
                stream.checkpoint()
        progress.close()

        final = dict(stream.state["history"][-1])
        if cfg.fluency_samples:
            final["fluency"] = stream_fluency(stream.lm, stream.requests, cfg)
            mlflow.log_metric("fluency", final["fluency"], step=cfg.num_edits)
        summary = stream.summary(final)
        log_file(run.info.run_id, stream.save_layers(cfg.out_dir / "edited_layers.safetensors"))
        mlflow.log_dict(summary, "summary.json")
    if cfg.output_json:
        Location(cfg.output_json).write_text(json.dumps(summary, indent=2))
    return summary


CLI_FLAGS = {  # flag -> config key
    "model": "model", "editor": "editor", "data": "data", "num_edits": "num_edits",
    "batch_size": "batch_size", "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every", "output_json": "output_json",
    "output_dir": "output_dir", "seed": "seed", "device": "device", "offset": "offset",
}


def parse_args(argv=None) -> StreamConfig:
    parser = argument_parser("pipelines.edit_stream", __doc__)
    parser.add_argument("--config", help="YAML file with StreamConfig keys")
    for flag in CLI_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag)
    parser.add_argument("--layers", help="comma-separated edit layers, e.g. 6 or 4,5,6")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. editor_args.mu=0.1 (repeatable)")
    args = parser.parse_args(argv)
    data = load_yaml(args.config) if args.config else {}
    for flag, key in CLI_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            set_override(data, f"{key}={value}")
    if args.layers:
        set_override(data, f"layers=[{args.layers}]")
    for assignment in args.set:
        set_override(data, assignment)
    return from_dict(StreamConfig, data)


def main(argv=None) -> None:
    setup_logging()
    with one_line_errors(argv):
        summary = run_stream(parse_args(argv))
    final, base = summary["final"], summary["unedited"]
    print(f"\n{'metric':28s} {'unedited':>9s} {'edited':>9s}")
    for key in final:
        if key in base and isinstance(final[key], float) and not math.isnan(final[key]):
            print(f"{key:28s} {base[key]:9.3f} {final[key]:9.3f}")
    print(f"seconds per edit: {summary['seconds_per_edit']:.2f}")
    print(how_to_open(summary["mlflow_run_id"]))


if __name__ == "__main__":
    main()
