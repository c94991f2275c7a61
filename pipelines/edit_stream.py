"""One edit stream, single process: a model, an editor, N CounterFact edits in order.

    python -m pipelines.edit_stream --model smollm2-135m --editor rlsedit \\
        --data ../shared/data/counterfact/counterfact-edit.json --num-edits 100 \\
        --batch-size 10 --eval-every 50 --output-json runs/summary.json
    python -m pipelines.edit_stream --config pipelines/configs/stream-demo.yaml --set editor_args.mu=0.1

One local cell of `pipelines/cell.py`: the same editor and evaluator a grid cell runs, the
same metrics logged. Evaluates every `eval_every` edits (edits so far, at most `eval_max`
of them, the first `retention_fraction` of the stream, held-out perplexity and, with
`capability.profile`, the lm-eval suite), logs to MLflow with step = edits applied,
checkpoints at each evaluation and every `checkpoint_minutes` (or `checkpoint_every`
edits; re-running the same command after a crash resumes there, with the same final
weights), and writes a JSON
summary: final metrics, retention, the unedited model's scores on the same prompts,
fluency, edits per second and the config. One driver at a time per output folder; a
resumed stream logs into the tracking store its run lives in (`pipelines/tracking.py`).
"""

from __future__ import annotations

import json
import logging
import math

from pipelines.cell import Cell, run_local
from pipelines.driver import Flag, config_parser, one_line_errors, read_config, setup_logging
from pipelines.tracking import check_tracking, how_to_open
from tasks.config import from_dict, to_dict
from tasks.lock import folder_lock
from tasks.preflight import check_stream
from tasks.storage import Location
from tasks.stream import StreamConfig

log = logging.getLogger("rlsedit.stream")


def run_stream(cfg: StreamConfig) -> dict:
    """Run (or resume) the stream as one local cell (`pipelines.cell.run_local`) once its
    inputs and the tracking store pass their checks; a second driver on the same output
    folder is refused. Its summary."""
    check_stream(cfg)
    check_tracking()
    out = cfg.out_dir
    with folder_lock(out):
        summary = run_local(Cell(cfg.name, cfg.model, cfg.editor,
                                 {**to_dict(cfg), "output_dir": str(out)}, out))
    if cfg.output_json:
        Location(cfg.output_json).write_text(json.dumps(summary, indent=2))
    return summary


FLAGS = tuple(Flag(name, name) for name in (
    "model", "editor", "data", "num_edits", "batch_size", "eval_every", "checkpoint_every",
    "output_json", "output_dir", "seed", "device", "offset")) + (
    Flag("layers", "layers", "comma-separated edit layers, e.g. 6 or 4,5,6", template="[{}]"),)


def parse_args(argv=None) -> StreamConfig:
    parser = config_parser("pipelines.edit_stream", __doc__, FLAGS,
                           config_help="YAML file with StreamConfig keys")
    return from_dict(StreamConfig, read_config(parser.parse_args(argv), FLAGS))


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
