"""Peak memory of the editor state per layer, and of a long edit stream.

    python -m bench.memory --append

1. Editor state per layer: for each layer shape and editor, a fresh process builds the
   editor from W0 and an anchor covariance (both already in memory and not counted), then
   folds in `--updates` batches of `--batch` keys. Reported from the kernel's counters
   (/proc/self/status; the peak is reset through /proc/self/clear_refs before each phase):
   the resident state after the build, the peak while building, and the peak above the
   state during the updates. Next to it the size of P (RLSEdit), of the kept d_k × d_k
   term (MEMIT: λC; AlphaEdit: projector and past KᵀK) and of W in their precision.
2. A stream configured for `--stream-edits` edits (all records loaded and checked, the
   anchor statistics from the cache): resident memory after setup and after every
   evaluation point over its first `--stream-run` edits, and the peak. The editor state
   has a fixed size, so nothing should grow with the number of edits applied.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

from bench.docs import append_section, command_line
from bench.update_cost import SHAPES

GIB = 2 ** 30


def rss() -> tuple[float, float]:
    """(resident, peak resident) bytes of this process."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def state_bytes(editor: str, d_k: int, d_v: int) -> float:
    """Bytes of what the editor keeps per layer: its d_k × d_k terms and W."""
    if editor == "rlsedit-float32":
        return 4 * (d_k * d_k + d_k * d_v)
    squares = {"rlsedit": 1, "memit": 1, "alphaedit": 2}[editor]
    return 8 * (squares * d_k * d_k + d_k * d_v)


def measure_editor(editor: str, shape: str, updates: int, batch: int) -> dict:
    """Runs in a child process: one editor on one layer shape."""
    import torch

    from bench.update_cost import synthetic_anchor
    from tasks.editors.alphaedit import AlphaEditArgs, AlphaEditEditor
    from tasks.editors.memit import MEMITArgs, MEMITEditor
    from tasks.editors.rls import RLSArgs, RLSEditor

    torch.manual_seed(0)
    d_k, d_v = SHAPES[shape]
    W0 = torch.randn(d_k, d_v) / d_k ** 0.5
    anchors = {0: synthetic_anchor(d_k)}
    keys = [(torch.randn(batch, d_k, dtype=torch.float64),
             torch.randn(batch, d_v, dtype=torch.float64)) for _ in range(updates)]
    before, _ = rss()
    reset_peak()
    if editor.startswith("rlsedit"):
        dtype = "float32" if editor.endswith("float32") else "float64"
        built = RLSEditor({0: W0}, anchors, RLSArgs(lam=1.0, mu=1e-3, dtype=dtype))
    elif editor == "memit":
        built = MEMITEditor({0: W0}, anchors, MEMITArgs(15000, 14336))
    else:
        built = AlphaEditEditor({0: W0}, anchors, AlphaEditArgs(l2=10.0, nullspace_threshold=2e-2))
    state, build_peak = rss()
    reset_peak()
    for K, V in keys:
        built.update(0, K, V)
    after, update_peak = rss()
    return {"editor": editor, "shape": shape, "d_k": d_k, "d_v": d_v,
            "expected": state_bytes(editor, d_k, d_v), "state": state - before,
            "build_peak": build_peak - before, "update_peak": update_peak - state,
            "after_updates": after - before}


def measure_stream(model: str, editor: str, num_edits: int, run: int, eval_every: int) -> dict:
    """Runs in a child process: the first `run` edits of a `num_edits` stream."""
    import tempfile

    from tasks.config import from_dict
    from tasks.stream import EditStream, StreamConfig

    start, _ = rss()
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(StreamConfig, {"model": model, "editor": editor, "num_edits": num_edits,
                                       "eval_every": eval_every, "fluency_samples": 0,
                                       "output_dir": out})
        stream = EditStream(cfg)
        setup, _ = rss()
        points = []
        while stream.position < run:
            if stream.step():
                stream.evaluate()
                stream.checkpoint()
                points.append((stream.position, rss()[0]))
        _, peak = rss()
    return {"model": model, "editor": editor, "num_edits": num_edits, "start": start,
            "setup": setup, "points": points, "peak": peak,
            "requests": len(stream.requests)}


def in_child(function: str, *args) -> dict:
    """Call `function(*args)` of this module in a fresh Python process (own counters)."""
    code = (f"import json, bench.memory as m; "
            f"print('RESULT' + json.dumps(m.{function}(*{args!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{function}{args} failed:\n{done.stderr[-3000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--editors", nargs="+",
                        default=["rlsedit", "rlsedit-float32", "memit", "alphaedit"])
    parser.add_argument("--skip", nargs="*", default=["llama3-8b:alphaedit"],
                        help="shape:editor pairs to leave out (AlphaEdit's d_k-wide eigh)")
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--stream-model", default="smollm2-135m")
    parser.add_argument("--stream-editor", default="rlsedit")
    parser.add_argument("--stream-edits", type=int, default=10000)
    parser.add_argument("--stream-run", type=int, default=100, help="0: no stream")
    parser.add_argument("--stream-eval-every", type=int, default=50)
    parser.add_argument("--append", action="store_true",
                        help="add the tables to docs/benchmarks.md")
    opts = parser.parse_args(argv)

    rows = ["| shape | editor | d_k × d_k terms + W | state (RSS) | peak while building | "
            "peak above the state while updating |", "|---|---|---|---|---|---|"]
    print("\n".join(rows))
    for shape in opts.shapes:
        for editor in opts.editors:
            if f"{shape}:{editor}" in opts.skip:
                continue
            r = in_child("measure_editor", editor, shape, opts.updates, opts.batch)
            rows.append(f"| {shape} | {editor} | {r['expected'] / GIB:.3f} GiB | "
                        f"{r['state'] / GIB:.3f} GiB | {r['build_peak'] / GIB:.3f} GiB | "
                        f"{r['update_peak'] / GIB:.3f} GiB |")
            print(rows[-1], flush=True)

    if not opts.stream_run:   # editor state only
        if opts.append:
            append_section("Peak memory of the editor state per layer",
                           command_line("bench.memory", argv),
                           f"{platform.machine()} CPU; resident set sizes from /proc/self/status",
                           f"{opts.updates} updates of {opts.batch} keys:\n\n" + "\n".join(rows))
        return
    s = in_child("measure_stream", opts.stream_model, opts.stream_editor, opts.stream_edits,
                 opts.stream_run, opts.stream_eval_every)
    stream_rows = ["| after | resident memory |", "|---|---|",
                   f"| imports | {s['start'] / GIB:.2f} GiB |",
                   f"| setup ({s['requests']} requests loaded and checked) | "
                   f"{s['setup'] / GIB:.2f} GiB |"]
    stream_rows += [f"| {n} edits and their evaluation | {b / GIB:.2f} GiB |"
                    for n, b in s["points"]]
    stream_rows.append(f"| peak over the run | {s['peak'] / GIB:.2f} GiB |")
    print("\n" + "\n".join(stream_rows))
    if opts.append:
        append_section(
            "Peak memory: editor state per layer, and a long stream",
            command_line("bench.memory", argv),
            f"{platform.machine()} CPU; resident set sizes from /proc/self/status",
            f"Editor state per layer ({opts.updates} updates of {opts.batch} keys):\n\n"
            + "\n".join(rows)
            + f"\n\n{s['model']} {s['editor']} stream configured for {s['num_edits']} edits, "
              f"first {opts.stream_run} applied (batch 10):\n\n" + "\n".join(stream_rows))


if __name__ == "__main__":
    main()
