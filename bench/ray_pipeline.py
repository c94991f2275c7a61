"""What Ray costs and buys: anchor statistics with 1 and 2 Ray workers on the same corpus,
and one grid cell through the Ray pipeline against the single-process stream.

    python -m bench.ray_pipeline --model smollm2-135m --anchor-texts 2000 --edits 20 --append

Both parts run in one process, side by side, on fresh caches for the anchor part (each
worker count computes the statistics from scratch). For the overhead part the anchor
statistics and the unedited scores are cached first, so both sides do the same work:
load the model, edit, evaluate at the same points, write their outputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from bench.docs import append_section, command_line


def time_anchor(opts, workers: int) -> float:
    from tasks.anchor import AnchorArgs
    from tasks.models import resolve_spec
    from tasks.remote.anchor_ray import ray_anchor_stats

    cache = Path(tempfile.mkdtemp(prefix="anchor-bench-"))
    models = Path(os.environ.get("RLSEDIT_CACHE", Path.home() / ".cache" / "rlsedit")) / "models"
    (cache / "models").symlink_to(models)   # the dequantised model, not the statistics
    previous = os.environ.get("RLSEDIT_CACHE")
    os.environ["RLSEDIT_CACHE"] = str(cache)
    try:
        tic = time.perf_counter()
        ray_anchor_stats(opts.model, list(resolve_spec(opts.model).edit_layers),
                         AnchorArgs(n_texts=opts.anchor_texts), n_shards=workers)
        return time.perf_counter() - tic
    finally:
        if previous is None:
            os.environ.pop("RLSEDIT_CACHE")
        else:
            os.environ["RLSEDIT_CACHE"] = previous
        shutil.rmtree(cache, ignore_errors=True)


def time_single_process(opts, out: Path) -> float:
    from pipelines.edit_stream import parse_args, run_stream

    tic = time.perf_counter()
    run_stream(parse_args(["--model", opts.model, "--editor", opts.editor,
                           "--num-edits", str(opts.edits), "--batch-size", "10",
                           "--eval-every", str(opts.eval_every), "--output-dir", str(out),
                           "--set", "fluency_samples=0", "--set", "experiment=bench-ray"]))
    return time.perf_counter() - tic


def time_grid(opts, out: Path) -> float:
    from pipelines.grid import GridConfig, ResourceArgs, resolve_paths, run_grid

    cfg = resolve_paths(GridConfig(
        name="bench-ray", models=[opts.model], editors=[opts.editor],
        stream={"num_edits": opts.edits, "batch_size": 10, "eval_every": opts.eval_every,
                "fluency_samples": 0},
        resources=ResourceArgs(editor_cpus=1, evaluator_cpus=1, anchor_shards=2),
        output_dir=str(out), experiment="bench-ray"))
    tic = time.perf_counter()
    run_grid(cfg)
    return time.perf_counter() - tic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--editor", default="rlsedit")
    parser.add_argument("--anchor-texts", type=int, default=2000)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--append", action="store_true")
    opts = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    anchor = {workers: time_anchor(opts, workers) for workers in (1, 2)}
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    time_single_process(opts, work / "warm")          # caches anchors and unedited scores
    single = time_single_process(opts, work / "single")
    grid = time_grid(opts, work / "grid")
    ray.shutdown()

    lines = [
        "| measurement | wall time (s) | ratio |", "|---|---|---|",
        f"| anchor statistics, {opts.anchor_texts} texts, 1 Ray worker | {anchor[1]:.1f} | 1.00 |",
        f"| anchor statistics, {opts.anchor_texts} texts, 2 Ray workers | {anchor[2]:.1f} | "
        f"{anchor[2] / anchor[1]:.2f} |",
        f"| {opts.editor}, {opts.edits} edits, single-process stream | {single:.1f} | 1.00 |",
        f"| {opts.editor}, {opts.edits} edits, one grid cell on Ray | {grid:.1f} | "
        f"{grid / single:.2f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if opts.append:
        append_section(f"Ray pipeline, {opts.model}", command_line("bench.ray_pipeline", argv),
                       f"{platform.machine()}, {os.cpu_count()} cores", table)


if __name__ == "__main__":
    main()
