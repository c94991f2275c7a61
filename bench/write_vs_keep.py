"""Written or kept: on every stored snapshot of a cell, the first k edits of the stream
against the last k applied before that snapshot.

    python -m bench.write_vs_keep /root/rlsedit-runs/grid-cpu-1k-m1300/cells/smollm2-135m-rlsedit-L23456-m1300-s0 --append

An editor's efficacy over the edits so far mixes two things: how well each new edit is
written and how well the old ones are kept. Retention scores the first edits; this scores
the newest too, on the same snapshot, so a falling efficacy can be told apart: old edits
fading (FT-L) or new edits landing less well as the stream grows (a least-squares editor
that keeps every earlier edit in its objective). Reads `snapshots/edits-<n>.safetensors`
of each cell directory and the stream's edits from `--data` (a stream that skipped no
records: edit i is record i); scores each window with the
streams' own `score_requests`. Results are kept in `--cache` (JSON) so that a run can stop
and go on.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.docs import publish
from pipelines.report import _value
from tasks.data import load_requests
from tasks.evaluate.metrics import aggregate, score_requests
from tasks.models import load_model
from tasks.stream import DEFAULT_DATA

METRICS = ("efficacy", "generalization")


def snapshots(cell_dir: str) -> list[tuple[int, Path]]:
    """(edits applied, file) of each snapshot of the cell, in edit order."""
    if not Path(cell_dir).is_dir():
        raise SystemExit(f"no cell folder {cell_dir}: give the cells/<name> folders of a grid")
    found = [(int(re.fullmatch(r"edits-(\d+)\.safetensors", p.name).group(1)), p)
             for p in Path(cell_dir, "snapshots").glob("edits-*.safetensors")]
    return sorted(found)


@torch.no_grad()
def windows_at(lm, requests, snapshot: Path, n_done: int, k: int) -> dict[str, float]:
    """first_<metric> and last_<metric> (± _se) of the first k and the last k edits applied,
    scored on the model with `snapshot`'s layers written in."""
    scores, windows = {}, {"first_": (0, k), "last_": (max(0, n_done - k), n_done)}
    with lm.layers_loaded(load_file(str(snapshot))):
        for prefix, (start, stop) in windows.items():
            agg = aggregate(score_requests(lm, requests[start:stop]), prefix)
            scores.update({key: value for key, value in agg.items()
                           if key.removeprefix(prefix).removesuffix("_se") in METRICS})
    return scores


def labels(cell_dirs: list[str]) -> dict[str, str]:
    """{cell folder: its name}, or "<grid>/<name>" where two grids have a cell of one name."""
    names = [Path(d).resolve().name for d in cell_dirs]
    return {d: (f"{Path(d).resolve().parent.parent.name}/{name}" if names.count(name) > 1
                else name) for d, name in zip(cell_dirs, names)}


def measure(cell_dirs: list[str], model: str, data: str, k: int, cache: Path | None) -> dict:
    """{cell label: {edits applied: window scores}}; the cache is keyed by the cells'
    absolute paths and the window, read from and added to."""
    results = json.loads(cache.read_text()) if cache and cache.exists() else {}
    key = {d: f"{Path(d).resolve()} window={k}" for d in cell_dirs}
    todo = {d: [(n, p) for n, p in snapshots(d) if str(n) not in results.get(key[d], {})]
            for d in cell_dirs}
    if any(todo.values()):
        lm = load_model(model)
        requests = load_requests(data, limit=max(n for d in todo.values() for n, _ in d))
        for cell_dir, pending in todo.items():
            for n_done, path in pending:
                scored = windows_at(lm, requests, path, n_done, k)
                results.setdefault(key[cell_dir], {})[str(n_done)] = scored
                print(f"{cell_dir} at {n_done}: first {scored['first_efficacy']:.3f}, "
                      f"last {scored['last_efficacy']:.3f}", flush=True)
                if cache:
                    cache.write_text(json.dumps(results, indent=1))
    return {label: results.get(key[d], {}) for d, label in labels(cell_dirs).items()}


def table(results: dict, k: int) -> str:
    """Markdown: one row per cell and snapshot."""
    header = ["cell, edits", *(f"{w}-{k} {m}" for m in METRICS for w in ("first", "last"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, points in results.items():
        for n_done, row in sorted(points.items(), key=lambda item: int(item[0])):
            cells = [_value(row, f"{w}_{m}") for m in METRICS for w in ("first", "last")]
            lines.append(f"| {name} {n_done} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell_dirs", nargs="+")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the streams' edit file")
    parser.add_argument("--window", type=int, default=100, help="k: edits in each window")
    parser.add_argument("--cache", type=Path, help="JSON of scores so far (resumes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    results = measure(opts.cell_dirs, opts.model, opts.data, opts.window, opts.cache)
    body = table(results, opts.window)
    publish(body, opts.append, f"Written or kept: the first {opts.window} edits against the "
            f"last {opts.window} applied", "bench.write_vs_keep", argv,
            f"this machine, {opts.threads} thread(s)")


if __name__ == "__main__":
    main()
