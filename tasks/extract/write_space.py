"""From the residual stream to the edited projection's output.

An editor writes V = K W at the MLP output projection, but the target value is optimised
where it acts, in the residual stream after the block. On Llama-style blocks the MLP output
is added to the stream as it is, so a change r wanted in the stream is the change r at the
projection. Gemma-2/3 pass it through an RMSNorm first (`post_feedforward_layernorm`):
the stream gets g ⊙ m / rms(m) for projection output m [d] and gain g [d].

`projection_change` maps a wanted stream change through that norm exactly: every y with
norm(y) = norm(m) + r is a positive multiple of u = (norm(m) + r) / g, since the norm
ignores scale; we take the one as long as m (for a small change, the closest to m to first
order; for a turn past 90° the closest positive multiple would shrink towards zero, where
the norm's epsilon takes over). When norm(m) + r is not an output the norm can give (it
only gives vectors with rms((·)/g) = 1) the direction is matched and the length is the
norm's: the closest the layer can get.
"""

from __future__ import annotations

import torch

from tasks.extract.keys import outputs_at
from tasks.extract.tokens import TokenBatch

GAIN_FLOOR = 1e-2   # output dims whose norm gain is under this × the median gain are fixed


def norm_gain(norm: torch.nn.Module, dim: int, like: torch.Tensor) -> torch.Tensor:
    """g [dim] of an RMS norm (any parametrisation, e.g. Gemma's 1 + weight): norm(1) = g."""
    if "rmsnorm" not in type(norm).__name__.lower():
        raise ValueError(f"the norm after the MLP is a {type(norm).__name__}; rlsedit can map "
                         f"edits through RMS norms only")
    return norm(torch.ones(dim, dtype=like.dtype, device=like.device))


def projection_change(norm: torch.nn.Module | None, m: torch.Tensor,
                      r: torch.Tensor) -> torch.Tensor:
    """The change y [E, d] at the projection's output that moves the stream by r [E, d],
    for projection outputs m [E, d] and the norm after the MLP (None: y = r)."""
    if norm is None:
        return r
    with torch.no_grad():
        m32, r32 = m.float(), r.float()
        gain = norm_gain(norm, m.shape[-1], m32)
        # a gain near 0 (Gemma-3 has some) leaves its output fixed: keep m's share there
        usable = gain.abs() > GAIN_FLOOR * gain.abs().median()
        rms = m32.pow(2).mean(-1, keepdim=True).sqrt()
        u = torch.where(usable, (norm(m32) + r32) / torch.where(usable, gain, 1.0), m32 / rms)
        scale = m32.norm(dim=-1, keepdim=True) / u.norm(dim=-1, keepdim=True)
        return (scale * u - m32).to(r.dtype)


def rescaled_change(norm: torch.nn.Module | None, m: torch.Tensor,
                    delta: torch.Tensor) -> torch.Tensor:
    """The change y [E, d] at the projection's output that moves the stream exactly as δ
    [E, d] does at outputs m [E, d], and leaves the output as long as m was (None: δ).

    Behind an RMS norm only the direction of m + δ reaches the stream, so any positive
    multiple of it will do; the optimiser's δ is often several times ‖m‖ long (the clamp
    binds on every Gemma-3 edit), while ‖y‖ = 2‖m‖ sin(θ/2) for the turn θ it makes:
    the same edit at the key, a smaller change to the weights."""
    if norm is None:
        return delta
    target = m + delta
    return m.norm(dim=-1, keepdim=True) * target / target.norm(dim=-1, keepdim=True) - m


def stream_change(norm: torch.nn.Module | None, m: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """The residual-stream change [.., d] a change y at the projection's output m makes
    (differentiable in y)."""
    if norm is None:
        return y
    return norm(m + y) - norm(m)


def projection_outputs_at(lm, layer: int, batch: TokenBatch) -> torch.Tensor:
    """Output of `layer`'s edited projection at each row's lookup position -> [B, d]."""
    return outputs_at(lm, lm.mlp_out(layer), batch)
