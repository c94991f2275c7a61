"""The RLS update before and after its rewrite, timed side by side in one process.

    python -m bench.rls_hotpath --append

`before` is the update as it stood until issue 6: Gᵀ = S⁻¹ K P by a Cholesky solve, P
replaced by a new matrix P − Gᵀ K P, every entry of the new P checked for NaN/Inf, then
symmetrised as (P + Pᵀ)/2 (three d_k × d_k temporaries and four passes over P per update).
`after` is `RLSLayerState.update`: X = L⁻¹ K P, P − XᵀX applied in place by one addmm,
the finiteness checks on the [u, d_k] factors and the new diagonal. Both start from the
same state and get the same batches; the two results are compared (they agree to rounding).
A per-phase profile of `before` at u=1 (the case that led to the rewrite) is printed too.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from bench.docs import append_section, command_line
from bench.update_cost import SHAPES, synthetic_anchor
from tasks.editors.base import check_batch, check_finite
from tasks.editors.rls import RLSLayerState


def update_before(state: RLSLayerState, K: torch.Tensor, V: torch.Tensor) -> None:
    """The pre-issue-6 update, kept here only to measure against."""
    check_batch(K, V, *state.W.shape)
    K, V = K.to(state.W), V.to(state.W)
    KP = K @ state.P
    S = KP @ K.T
    S.diagonal().add_(1.0)
    chol = torch.linalg.cholesky(S)
    gain_t = torch.cholesky_solve(KP, chol)
    delta_W = gain_t.T @ (V - K @ state.W)
    P = state.P - gain_t.T @ KP
    check_finite("updated P", P)
    check_finite("updated W", delta_W)
    state.P = (P + P.T) / 2
    state.W = state.W + delta_W


def phases_before(state: RLSLayerState, K: torch.Tensor, V: torch.Tensor) -> dict[str, float]:
    """Seconds per phase of `update_before` (one call)."""
    times, tic = {}, time.perf_counter()

    def mark(name):
        nonlocal tic
        now = time.perf_counter()
        times[name] = now - tic
        tic = now

    KP = K @ state.P
    S = KP @ K.T
    S.diagonal().add_(1.0)
    gain_t = torch.cholesky_solve(KP, torch.linalg.cholesky(S))
    delta_W = gain_t.T @ (V - K @ state.W)
    mark("gain and ΔW (K P, S, solve, ΔW)")
    P = state.P - gain_t.T @ KP
    mark("P − Gᵀ K P (new matrix)")
    check_finite("updated P", P)
    mark("NaN/Inf check of the whole P")
    state.P = (P + P.T) / 2
    mark("(P + Pᵀ) / 2")
    state.W = state.W + delta_W
    mark("W + ΔW")
    return times


def make_state(d_k: int, d_v: int, dtype: torch.dtype, seed: int = 0) -> RLSLayerState:
    generator = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_k, d_v, generator=generator) / d_k ** 0.5
    return RLSLayerState.init(W0, synthetic_anchor(d_k).cov, 1.0, 1e-3, dtype)


def compare(shape: str, d_k: int, d_v: int, u: int, dtype: torch.dtype, repeats: int) -> dict:
    """Median seconds of `before` and `after` over the same `repeats` batches, alternating."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(u, d_k, generator=generator, dtype=dtype),
                torch.randn(u, d_v, generator=generator, dtype=dtype)) for _ in range(repeats)]
    old, new = make_state(d_k, d_v, dtype), make_state(d_k, d_v, dtype)
    update_before(old, *batches[0])     # warm-up, both
    new.update(*batches[0])
    times = {"before": [], "after": []}
    for K, V in batches[1:]:
        tic = time.perf_counter()
        update_before(old, K, V)
        times["before"].append(time.perf_counter() - tic)
        tic = time.perf_counter()
        new.update(K, V)
        times["after"].append(time.perf_counter() - tic)
    rel = float((old.W - new.W).norm() / new.W.norm())
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "u": u,
            "before": before, "after": after, "speedup": before / after, "W_rel_diff": rel}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                        choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", action="store_true", help="add the tables to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    d_k, d_v = SHAPES[opts.shapes[0]]
    state = make_state(d_k, d_v, torch.float64)
    generator = torch.Generator().manual_seed(2)
    runs = []
    for _ in range(opts.repeats):
        K = torch.randn(1, d_k, generator=generator, dtype=torch.float64)
        runs.append(phases_before(state, K, torch.randn(1, d_v, generator=generator,
                                                        dtype=torch.float64)))
    profile = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    total = sum(profile.values())
    profile_lines = ["| phase of the old update | ms | share |", "|---|---|---|"]
    profile_lines += [f"| {name} | {sec * 1e3:.2f} | {sec / total:.0%} |"
                      for name, sec in profile.items()]
    print(f"old update, {opts.shapes[0]} float64, u=1:\n" + "\n".join(profile_lines))

    lines = ["| shape | dtype | u | before ms | after ms | speed-up | ‖W_before − W_after‖/‖W‖ |",
             "|---|---|---|---|---|---|---|"]
    print("\n" + "\n".join(lines))
    for shape in opts.shapes:
        d_k, d_v = SHAPES[shape]
        for dtype in (torch.float64, torch.float32):
            for u in opts.batches:
                row = compare(shape, d_k, d_v, u, dtype, opts.repeats)
                lines.append(f"| {shape} | {row['dtype']} | {u} | {row['before'] * 1e3:.2f} | "
                             f"{row['after'] * 1e3:.2f} | {row['speedup']:.2f} | "
                             f"{row['W_rel_diff']:.1e} |")
                print(lines[-1], flush=True)
    if opts.append:
        append_section(
            "The RLS update rewritten: before and after, side by side",
            command_line("bench.rls_hotpath", argv),
            f"{platform.machine()} CPU, {torch.get_num_threads()} threads, median of "
            f"{opts.repeats - 1} updates each, alternating",
            f"Where the old update's time went ({opts.shapes[0]}, float64, u=1):\n\n"
            + "\n".join(profile_lines) + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
