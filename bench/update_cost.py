"""Cost of one editor update against the number of edits already applied.

    python -m bench.update_cost --append
    python -m bench.update_cost --shapes llama3-8b --batches 1 10 100 --baseline-repeats 1 --append

For each layer shape (d_k, d_v) and batch size u, RLSEdit's update (`RLSEditor.update`:
Woodbury gain, W and P updated) is timed after 10, 100, 1,000 and 10,000 edits, with
MEMIT's and AlphaEdit's update on the same keys and values beside it. The state after h
edits is reached by folding h random keys in (in batches of `--fold-batch`; RLS is exact,
so the state equals the one h single-key updates give up to rounding). Timings are the
median of `--repeats` updates, measured in this one process side by side. The FLOP/s
column is RLSEdit's arithmetic (≈ 4·u·d_k² + 4·u·d_k·d_v) over its time, next to this
machine's float64 matmul rate (the limit). The anchor covariance is a diagonal with a
decaying spectrum: no update's cost depends on its values.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from bench.docs import append_section, command_line
from tasks.anchor import AnchorStats
from tasks.editors.alphaedit import AlphaEditArgs, AlphaEditEditor
from tasks.editors.memit import MEMITArgs, MEMITEditor
from tasks.editors.rls import RLSArgs, RLSEditor

SHAPES = {"smollm2-135m": (1536, 576), "gemma3-270m": (2048, 640),
          "llama3-8b": (14336, 4096)}
HISTORY = (10, 100, 1000, 10000)


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """This machine's dense matmul rate (FLOP/s) for n×n by n×n in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tic)
    return 2 * n ** 3 / min(times)


def synthetic_anchor(d_k: int, count: int = 100_000) -> AnchorStats:
    """A diagonal K0ᵀK0 whose mean covariance spans 1e-4 .. 10 (AlphaEdit finds a null space)."""
    spectrum = torch.logspace(1, -4, d_k, dtype=torch.float64)
    return AnchorStats(torch.diag(spectrum * count), count)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def rls_flops(u: int, d_k: int, d_v: int) -> float:
    return 4.0 * u * d_k * d_k + 4.0 * u * d_k * d_v


def bench_shape(name: str, d_k: int, d_v: int, batches, history, repeats: int,
                baseline_repeats: int, baselines: bool, fold_batch: int = 1000,
                seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_k, d_v, generator=generator) / d_k ** 0.5
    anchors = {0: synthetic_anchor(d_k)}

    def batch(u):
        return (torch.randn(u, d_k, generator=generator, dtype=torch.float64),
                torch.randn(u, d_v, generator=generator, dtype=torch.float64))

    editors = {"rlsedit": RLSEditor({0: W0}, anchors, RLSArgs(lam=1.0, mu=1e-3))}
    if baselines:
        editors["memit"] = MEMITEditor({0: W0}, anchors, MEMITArgs(15000, 14336))
        editors["alphaedit"] = AlphaEditEditor({0: W0}, anchors, AlphaEditArgs(l2=10.0, nullspace_threshold=2e-2))
    rows, applied = [], 0
    for h in history:
        while applied < h:   # fold keys in until h edits are in every editor's state
            u = min(fold_batch, h - applied)
            K, V = batch(u)
            for editor in editors.values():
                editor.update(0, K, V)
            applied += u
        for u in batches:
            K, V = batch(u)
            row = {"shape": name, "d_k": d_k, "d_v": d_v, "u": u, "history": applied}
            for editor_name, editor in editors.items():
                n = repeats if editor_name == "rlsedit" else baseline_repeats
                state = copy.deepcopy(editor.state_dict())   # timed updates must not move the history
                row[editor_name] = timed(lambda: editor.update(0, K, V), n)
                editor.load_state_dict(state)
            row["rls_flops"] = rls_flops(u, d_k, d_v) / row["rlsedit"]
            rows.append(row)
            print(_row_line(row, baselines), flush=True)
    return rows


def _row_line(row: dict, baselines: bool) -> str:
    cells = [row["shape"], str(row["u"]), str(row["history"]), f"{row['rlsedit'] * 1e3:.2f}",
             f"{row['rls_flops'] / 1e9:.1f}"]
    if baselines:
        cells += [f"{row['memit'] * 1e3:.1f}", f"{row['alphaedit'] * 1e3:.1f}",
                  f"{row['memit'] / row['rlsedit']:.1f}", f"{row['alphaedit'] / row['rlsedit']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def flat_cost_lines(rows: list[dict]) -> list[str]:
    """Per shape and batch size: time after the most edits over time after the fewest."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for u in dict.fromkeys(r["u"] for r in rows if r["shape"] == shape):
            series = sorted((r for r in rows if r["shape"] == shape and r["u"] == u),
                            key=lambda r: r["history"])
            first, last = series[0], series[-1]
            ratio = {e: last[e] / first[e] for e in ("rlsedit", "memit", "alphaedit") if e in last}
            lines.append(f"| {shape} | {u} | {last['history']} / {first['history']} | " +
                         " | ".join(f"{ratio[e]:.2f}" for e in ratio) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--history", nargs="+", type=int, default=list(HISTORY))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--fold-batch", type=int, default=1000,
                        help="keys per update while building the history (not timed)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", action="store_true", help="add the tables to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    baselines = not opts.no_baselines
    peak64, peak32 = matmul_flops(torch.float64), matmul_flops(torch.float32)
    print(f"matmul limit: {peak64 / 1e9:.1f} GFLOP/s float64, {peak32 / 1e9:.1f} float32 "
          f"({torch.get_num_threads()} threads)")
    header = ["shape", "u", "edits before", "RLSEdit ms", "RLSEdit GFLOP/s"]
    if baselines:
        header += ["MEMIT ms", "AlphaEdit ms", "MEMIT / RLSEdit", "AlphaEdit / RLSEdit"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows = []
    for shape in opts.shapes:
        d_k, d_v = SHAPES[shape]
        rows += bench_shape(shape, d_k, d_v, opts.batches, opts.history, opts.repeats,
                            opts.baseline_repeats, baselines, opts.fold_batch)
    flat_header = ["shape", "u", "edits (last / first)", "RLSEdit ratio"]
    if baselines:
        flat_header += ["MEMIT ratio", "AlphaEdit ratio"]
    flat = ["| " + " | ".join(flat_header) + " |", "|" + "---|" * len(flat_header),
            *flat_cost_lines(rows)]
    print("\nflat cost (time per update after the most edits / after the fewest):")
    print("\n".join(flat))
    if opts.append:
        table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                 *(_row_line(r, baselines) for r in rows)]
        append_section("Update cost against edits already applied",
                       command_line("bench.update_cost", argv),
                       f"{platform.machine()} CPU, {torch.get_num_threads()} threads; matmul limit "
                       f"{peak64 / 1e9:.1f} GFLOP/s float64, {peak32 / 1e9:.1f} float32",
                       "\n".join(table) + "\n\nFlat cost:\n\n" + "\n".join(flat))


if __name__ == "__main__":
    main()
