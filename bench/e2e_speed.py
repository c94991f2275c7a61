"""End-to-end edits per second of every editor on one model, and where the time goes.

    python -m bench.e2e_speed --num-edits 30 --append

One process holds one `EditStream` per editor (same data, layers, batch size and
target-value settings) and steps them round-robin, batch by batch, so every editor is
timed under the same load (after one warm-up batch each, not counted). Per editor: edits/s over the edit steps, the seconds per edit
in each phase (`tasks/edit_step.py`: target-value optimisation, keys, the editor's update
with the weights written back), the evaluation at the end (CounterFact metrics of the
edits so far and of the first 10%, as at a stream's evaluation points), and the one-off setup (model load, anchor
statistics from the disk cache, editor state). Then a torch profile of one more RLSEdit
batch: the operators with the most self CPU time, with the FLOP/s of those torch counts
(matmuls), to set against this machine's float32 matmul rate at the same thread count,
measured at the end.

    python -m bench.e2e_speed --editors rlsedit --stops nll margin --num-edits 30 --append
    python -m bench.e2e_speed --editors rlsedit --stops nll margin2-bf16 --num-edits 50 --append

times the value optimisation's stop rules side by side in the same way (issue 15: the NLL
stop before, the margin stop after; replays in float32 unless the variant is
`margin2-bf16`), the speed-up against the first stream.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from bench.docs import append_section, command_line
from bench.update_cost import matmul_flops
from bench.value_stops import VARIANTS
from tasks.config import from_dict
from tasks.editors import editor_registry
from tasks.stream import DEFAULT_DATA, EditStream, StreamConfig

PHASES = ("values", "keys", "update")


def build_streams(opts, out_dir: str) -> tuple[dict[str, EditStream], dict[str, float]]:
    """One stream per editor and value stop rule, named `editor` or, with several stop
    rules, `editor@stop`; and the seconds each took to set up."""
    streams, setup = {}, {}
    for editor in opts.editors:
        for stop in opts.stops:
            name = editor if len(opts.stops) == 1 else f"{editor}@{stop}"
            cfg = from_dict(StreamConfig, {
                "model": opts.model, "editor": editor, "data": opts.data,
                "num_edits": opts.num_edits + 2 * opts.batch_size,   # + warm-up, profiled
                "batch_size": opts.batch_size, "eval_every": 10 ** 9, "fluency_samples": 0,
                "checkpoint_every": 10 ** 9, "output_dir": f"{out_dir}/{name}",
                "values": {"autocast": None, **VARIANTS.get(stop, {"stop_on": stop})},
                **({"layers": [int(x) for x in opts.layers.split(",")]} if opts.layers else {})})
            tic = time.perf_counter()
            streams[name] = EditStream(cfg)
            setup[name] = time.perf_counter() - tic
    return streams, setup


def profile_batch(stream: EditStream, rows: int) -> list[str]:
    """Markdown rows: the operators with the most self CPU time in one edit step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        stream.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | self CPU ms | share | calls | GFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| `{e.key}` | {e.self_cpu_time_total / 1e3:.0f} | "
              f"{e.self_cpu_time_total / total:.1%} | {e.count} | "
              f"{e.flops / e.self_cpu_time_total / 1e3 if e.flops else 0:.1f} |"
              for e in events[:rows]]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--editors", nargs="+", default=list(editor_registry()))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--stops", nargs="+", default=["margin"],
                        choices=list(dict.fromkeys(["margin", "nll", "total", *VARIANTS])),
                        help="value stop rules (values.stop_on) or bench.value_stops "
                             "variants (margin2-bf16: with bfloat16 replays); several: one "
                             "stream per editor and rule, the speed-up against the first")
    parser.add_argument("--layers", help="comma-separated edit layers (default: the model's)")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", action="store_true",
                        help="add the tables to docs/benchmarks.md")
    return parser.parse_args(argv)


def timed_batches(streams: dict[str, EditStream], opts) -> dict[str, tuple[float, dict]]:
    """A warm-up batch each (not counted), then `opts.num_edits` edits each, round-robin
    batch by batch: per editor, the edit seconds and the seconds per phase."""
    for stream in streams.values():
        stream.step()
        stream.state["edit_seconds"], stream.state["phase_seconds"] = 0.0, {}
    for _ in range(0, opts.num_edits, opts.batch_size):
        for editor, stream in streams.items():
            tic = time.perf_counter()
            stream.step()
            print(f"{editor}: {stream.position} edits, this batch "
                  f"{time.perf_counter() - tic:.1f} s", flush=True)
    # what the timed batches cost, read before a profiled batch adds to it
    return {editor: (stream.state["edit_seconds"], dict(stream.state["phase_seconds"]))
            for editor, stream in streams.items()}


def evaluation_seconds(streams: dict[str, EditStream]) -> dict[str, float]:
    """Per editor, the seconds of one evaluation of the edits so far."""
    seconds = {}
    for editor, stream in streams.items():
        tic = time.perf_counter()
        stream.evaluate()
        seconds[editor] = time.perf_counter() - tic
    return seconds


def measure(opts) -> dict:
    """Every editor's streams built, timed, evaluated, and one RLSEdit batch profiled."""
    with tempfile.TemporaryDirectory() as out_dir:
        streams, setup = build_streams(opts, out_dir)
        timed = timed_batches(streams, opts)
        evaluate = evaluation_seconds(streams)
        profiled = [name for name in streams if name.split("@")[0] == "rlsedit"]
        profile = profile_batch(streams[profiled[-1]], opts.profile_rows) \
            if profiled and opts.profile_rows else []
        layers = list(next(iter(streams.values())).layers)
    return {"setup": setup, "timed": timed, "evaluate": evaluate, "profile": profile,
            "layers": layers}


def speed_table(opts, result: dict) -> list[str]:
    """Markdown rows: per editor, edits/s, seconds per edit and per phase, evaluation, setup."""
    header = ["editor", "edits/s", "s/edit", "speed-up", *(f"{p} s/edit" for p in PHASES),
              "update share", f"evaluation of {opts.num_edits + opts.batch_size} edits, s",
              "setup s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = next(iter(result["timed"].values()))[0]
    for editor, (seconds, phases) in result["timed"].items():
        n = opts.num_edits
        cells = [editor, f"{n / seconds:.3f}", f"{seconds / n:.2f}", f"{first / seconds:.2f}x",
                 *(f"{phases.get(p, 0.0) / n:.3f}" for p in PHASES),
                 f"{phases.get('update', 0.0) / seconds:.1%}",
                 f"{result['evaluate'][editor]:.1f}", f"{result['setup'][editor]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def append_tables(opts, argv, lines: list[str], profile: list[str], layers: list[int],
                  limit: float) -> None:
    """The speed table and the profile, as a section of docs/benchmarks.md."""
    body = "\n".join(lines)
    if profile:
        body += (f"\n\nOne more RLSEdit batch of {opts.batch_size} edits under the torch "
                 f"profiler, operators by self CPU time:\n\n" + "\n".join(profile))
    append_section(
        f"End-to-end speed per editor, {opts.model}, {opts.num_edits} edits "
        f"(batch {opts.batch_size}, layers {layers})",
        command_line("bench.e2e_speed", argv),
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, editors stepped "
        f"round-robin in one process; float32 matmul limit at these threads "
        f"{limit:.0f} GFLOP/s", body)


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = measure(opts)
    lines = speed_table(opts, result)
    print("\n".join(lines))
    limit = matmul_flops(torch.float32) / 1e9
    print(f"float32 matmul limit at {torch.get_num_threads()} threads: {limit:.0f} GFLOP/s")
    if result["profile"]:
        print(f"\none more rlsedit batch of {opts.batch_size}, torch profiler:\n"
              + "\n".join(result["profile"]))
    if opts.append:
        append_tables(opts, argv, lines, result["profile"], result["layers"], limit)


if __name__ == "__main__":
    main()
