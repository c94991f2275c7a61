"""Choose editors' hyper-parameters on counterfact-train.json (never the edit set): a grid
whose cells are settings of editors (`variants`), refused unless every cell edits
counterfact-train.json.

    python -m bench.tune_on_train --config pipelines/configs/fidelity-sweep-2.yaml --append
    python -m bench.tune_on_train --num-edits 100 --grid 6:1.0:0.01 6:1.0:0.001
    python -m bench.tune_on_train --num-edits 20 --grid ft:norm_bound=5e-4 ft:norm_bound=5e-3

A `--grid` point is `editor:key=value,key=value` (settings of tasks/editors/editors.yaml,
plus `layers=6` or `layers=4+5+6`), or RLSEdit's older form `layer:lam:mu`. The points
become the variants of a grid config (tune_config) of `--num-edits` sequential edits
(batch 10) from the start of counterfact-train.json, scored once at the end, in
runs/tune/<name>/ (re-running the command resumes). Other options (`--set`,
`--output-json`) go to `pipelines.grid`; the grid's table is printed and, with --append,
added to docs/benchmarks.md under this command line.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

from bench.grid_command import describe, grid_parser, record, run
from tasks.config import set_override
from tasks.errors import UserError

TRAIN = "../shared/data/counterfact/counterfact-train.json"


def parse_point(point: str) -> tuple[str, dict[str, str]]:
    """`editor:k=v,k=v` or `layer:lam:mu` -> (editor, {key: value})."""
    if re.fullmatch(r"\d+:[^:=]+:[^:=]+", point):
        layer, lam, mu = point.split(":")
        return "rlsedit", {"layers": layer, "lam": lam, "mu": mu}
    editor, _, rest = point.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item)
    return editor, settings


def point_variant(point: str) -> tuple[str, dict]:
    """A grid point as (name, variant): `ft-norm_bound5e-4`, {editor, editor_args, stream}."""
    editor, settings = parse_point(point)
    variant = {"editor": editor}
    layers = settings.pop("layers", None)
    if layers:
        set_override(variant, f"stream.layers=[{layers.replace('+', ',')}]")
    for key, value in settings.items():
        set_override(variant, f"editor_args.{key}={value}")
    parts = [editor, *([f"L{layers}"] if layers else []), *(k + v for k, v in settings.items())]
    return re.sub(r"[^\w.+-]", "_", "-".join(parts)), variant


def tune_config(points: list[str], model: str, num_edits: int) -> dict:
    """The grid of `points` on `model`; its name ends in a digest of its settings, so the
    same command finds its output folder again and other points get their own."""
    variants = dict(point_variant(point) for point in points)
    cfg = {"models": [model], "editors": list(variants), "variants": variants,
           "stream": {"data": TRAIN, "num_edits": num_edits, "batch_size": 10,
                      "eval_every": num_edits, "fluency_samples": 0},
           "experiment": "rlsedit-tune"}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    name = f"tune-{model.replace('/', '_')}-n{num_edits}-{digest}"
    return {"name": name, **cfg, "output_dir": f"runs/tune/{name}"}


def check_train(cfg) -> None:
    """A UserError unless every cell of the grid `cfg` edits counterfact-train.json."""
    data = [cfg.stream.get("data")] + [v.get("stream", {}).get("data")
                                       for v in cfg.variants.values()]
    wrong = sorted({d for d in data if d and Path(d).name != Path(TRAIN).name})
    if wrong:
        raise UserError(f"tuning edits only {Path(TRAIN).name}, never the edit set; this "
                        f"grid edits {', '.join(wrong)}: set stream.data to {TRAIN}")


def main(argv=None) -> dict:
    parser = grid_parser(__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a sweep's grid YAML (pipelines/configs/)")
    source.add_argument("--grid", nargs="+", help="points: editor:key=value,... or layer:lam:mu")
    parser.add_argument("--num-edits", type=int, help="with --grid (default 100)")
    parser.add_argument("--model", help="with --grid (default smollm2-135m)")
    opts, grid_argv = parser.parse_known_args(argv)
    if opts.config and (opts.num_edits or opts.model):
        parser.error("--num-edits and --model go with --grid; with --config, --set them")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as generated:
        if opts.grid:
            json.dump(tune_config(opts.grid, opts.model or "smollm2-135m",
                                  opts.num_edits or 100), generated)
            generated.flush()
        result = run(["--config", opts.config or generated.name, *grid_argv], check_train)
    record(result, "bench.tune_on_train", argv, f"Tuning, {describe(result)}",
           result["table"], opts.append)
    return result


if __name__ == "__main__":
    main()
