"""Numerical health of the RLS recursion over a long stream, float64 against float32 state.

    python -m bench.numerical_health --updates 10000 --append

One layer of smollm2-135m's shape (d_k=1536, d_v=576) with its real layer-6 anchor
statistics (the disk cache; computed when missing) receives `--updates` single-key
updates (u=1). Keys are Gaussian with the anchor keys' mean scale, target values Gaussian
with W0's output scale. At checkpoints the recursion's W is compared with the closed-form
minimiser W* = (λI + μK0ᵀK0 + KᵀK)⁻¹ (λW0 + μK0ᵀK0 W0 + KᵀV), solved afresh in float64,
and P is checked for symmetry and positive-definiteness (its smallest eigenvalue).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from bench.docs import append_section, command_line
from tasks.anchor import AnchorArgs, cached_anchor_stats
from tasks.editors.rls import RLSArgs, RLSEditor
from tasks.models import load_model


def closed_form(W0, anchor_cov, keys, values, lam, mu):
    """W* [d_k, d_v] in float64 from all keys [n, d_k] and values [n, d_v] so far."""
    precision = mu * anchor_cov + keys.T @ keys
    precision.diagonal().add_(lam)
    rhs = lam * W0 + mu * anchor_cov @ W0 + keys.T @ values
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(precision))


def health(editor, W_star) -> dict:
    state = editor.states[0]
    P = state.P.double()
    W = state.W.double()
    return {"w_drift": float((W - W_star).norm() / W_star.norm()),
            "p_asymmetry": float((P - P.T).norm() / P.norm()),
            "p_min_eig": float(torch.linalg.eigvalsh((P + P.T) / 2)[0]),
            "p_max_eig": float(torch.linalg.eigvalsh((P + P.T) / 2)[-1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--updates", type=int, default=10000)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--mu", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)

    lm = load_model(opts.model)
    anchor = cached_anchor_stats(lm, [opts.layer], AnchorArgs())[opts.layer]
    W0 = lm.edit_weight(opts.layer).double()
    anchor_cov = anchor.cov.double()
    d_k, d_v = W0.shape
    key_scale = float((anchor_cov.trace() / anchor.count / d_k) ** 0.5)
    value_scale = float(W0.std() * key_scale * d_k ** 0.5)
    generator = torch.Generator().manual_seed(opts.seed)
    keys = torch.randn(opts.updates, d_k, generator=generator, dtype=torch.float64) * key_scale
    values = torch.randn(opts.updates, d_v, generator=generator, dtype=torch.float64) * value_scale

    editors = {dtype: RLSEditor({0: W0}, {0: anchor}, RLSArgs(opts.lam, opts.mu, dtype))
               for dtype in ("float64", "float32")}
    rows, seconds = [], {dtype: 0.0 for dtype in editors}
    checkpoints = sorted(c for c in opts.checkpoints if c <= opts.updates)
    done = 0
    for checkpoint in checkpoints:
        for i in range(done, checkpoint):
            for dtype, editor in editors.items():
                tic = time.perf_counter()
                editor.update(0, keys[i:i + 1], values[i:i + 1])
                seconds[dtype] += time.perf_counter() - tic
        done = checkpoint
        W_star = closed_form(W0, anchor_cov, keys[:done], values[:done], opts.lam, opts.mu)
        for dtype, editor in editors.items():
            row = {"updates": done, "dtype": dtype, **health(editor, W_star),
                   "ms_per_update": 1e3 * seconds[dtype] / done}
            rows.append(row)
            print(row, flush=True)

    header = "| updates | state | ‖W − W*‖/‖W*‖ | ‖P − Pᵀ‖/‖P‖ | λ_min(P) | λ_max(P) | ms/update |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['updates']} | {r['dtype']} | {r['w_drift']:.2e} | {r['p_asymmetry']:.2e} | "
              f"{r['p_min_eig']:.3e} | {r['p_max_eig']:.3e} | {r['ms_per_update']:.2f} |"
              for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if opts.append:
        append_section(f"Numerical health of the RLS recursion, {opts.model} layer {opts.layer} "
                       f"shape (d_k={d_k}, d_v={d_v}), u=1, λ={opts.lam}, μ={opts.mu}",
                       command_line("bench.numerical_health", argv),
                       f"{platform.machine()} CPU, {torch.get_num_threads()} threads; random keys "
                       f"and values at the anchor keys' and W0's scales", table)


if __name__ == "__main__":
    main()
