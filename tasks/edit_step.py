"""One step of an edit stream: what the editor needs for a batch, the editor's update, the
new weights written into the model. Shared by every editor.

Key/value editors (RLSEdit, MEMIT, AlphaEdit) get the same keys and target values from
`tasks/extract`; loss editors (FT) get the batch's target-token loss as a function of the
edit layers' weights.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tasks.data import EditRequest
from tasks.editors.base import Editor
from tasks.evaluate.metrics import continuation_scores
from tasks.extract.hooks import replace_linear_weights
from tasks.extract.keys import KeyArgs, block_outputs_at, compute_keys, group_mean
from tasks.extract.prompts import kl_batch, prompt_batch, rewrite_batch, template_prefix
from tasks.extract.values import TargetValues, ValueArgs, compute_target_values, project_out
from tasks.extract.write_space import projection_change, projection_outputs_at, rescaled_change
from tasks.models import vocab_logits


class PhaseClock:
    """Wall seconds per phase of one edit step (`with clock("keys"): ...`), reported as
    `seconds_<phase>` stats. Phases: values (target-value optimisation), keys, update
    (the editor's update and the weights written back)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, phase: str) -> None:
        self._started[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        elapsed = time.perf_counter() - self._started.pop(phase)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed

    @contextmanager
    def __call__(self, phase: str):
        self.start(phase)
        yield
        self.stop(phase)

    def stats(self) -> dict[str, float]:
        return {f"seconds_{phase}": sec for phase, sec in self.seconds.items()}


class EditBatchError(ValueError):
    """A batch the editor refused (NaN/Inf keys or values, a lost positive definiteness)."""


def apply_edit_batch(lm, editor: Editor, requests: list[EditRequest], templates: list[str],
                     layers: tuple[int, ...], value_args: ValueArgs,
                     key_args: KeyArgs | None = None,
                     avoid: dict[int, torch.Tensor] | None = None) -> dict:
    """Edit `requests` into `lm` in place through `editor`; returns what changed:
    `update_norm_L{l}` = ||ΔW||_F per layer, the size of the requested change;
    `written_share_L{l}` = ||K ΔW||_F / ||V − K W||_F, how much of the change asked at the
    batch's own keys the editor wrote (1: all of it; RLSEdit writes S(I+S)⁻¹ of it with
    S = K P Kᵀ, below 1); phase timings, and under "edits" one record per edit of how its
    target value converged. With `value_args.rewrite_below` set, the edits whose margin
    falls short of it after the write (on the bare prompt, or with `rewrite_on: prompts`
    the least over the value optimisation's prompts) have their rows submitted once more
    (each layer's keys and targets as the first pass measured them): `rewritten` counts
    them and `bare_margin_mean` (or `prompt_margin_mean`) is the batch's mean margin before
    that. `avoid` {layer: [r, d_v]}: orthonormal output directions (`values.avoid_written`)
    the target values' deltas are kept orthogonal to (those of the value layer, the last)
    and, with `values.avoid_on: writes`, that each layer's asked change loses."""
    if editor.needs == "loss":
        return _fine_tune_batch(lm, editor, requests, layers)
    key_args = key_args or KeyArgs()
    stats, rows = _key_value_batch(lm, editor, requests, templates, layers, value_args, key_args,
                                   avoid)
    if value_args.rewrite_below is None:
        return stats
    on_prompts = value_args.rewrite_on == "prompts"
    margins = least_margins(lm, requests, templates if on_prompts else ["{}"])
    weak = margins < value_args.rewrite_below                                  # [E]
    margin_name = "prompt_margin_mean" if on_prompts else "bare_margin_mean"
    stats.update({"rewritten": int(weak.sum()), margin_name: float(margins.mean())})
    if weak.any():   # their rows once more, with the same targets: weight 2 in the sum
        tic = time.perf_counter()
        for layer, (keys, values, key_edits) in rows.items():
            again = weak.to(key_edits.device)[key_edits]
            _update_layer(lm, editor, layer, keys[again], values[again], requests)
        stats["seconds_update"] += time.perf_counter() - tic
    return stats


def least_margins(lm, requests: list[EditRequest], templates: list[str]) -> torch.Tensor:
    """[E] how far each edit's prompt under `templates` ("{}": the bare prompt; a prefix
    before "{}") prefers target_new over ground_truth on the model as it is, the least over
    the templates: mean-token NLL of the truth minus that of the new target (efficacy
    scores the bare prompt's > 0)."""
    prefixes = [template_prefix(template) for template in templates]
    nll, _ = continuation_scores(lm, [(prefix + r.prompt, answer)     # edit-major
                                      for r in requests for prefix in prefixes
                                      for answer in (r.target_new, r.ground_truth)])
    return (nll[1::2] - nll[0::2]).view(len(requests), len(templates)).min(dim=1).values


def layer_change(lm, layer: int, bare, wanted: torch.Tensor) -> torch.Tensor:
    """The change [E, d] at `layer`'s projection output that moves the residual stream by
    `wanted` [E, d] at the bare prompts' subject tokens (through a post-MLP norm if any)."""
    norm = lm.mlp_post_norm(layer)
    if norm is None:
        return wanted
    return projection_change(norm, projection_outputs_at(lm, layer, bare), wanted)


def single_layer_change(lm, layer: int, bare, delta: torch.Tensor) -> torch.Tensor:
    """The optimised projection change δ [E, d] itself, or behind a post-MLP norm the
    change of the same effect that keeps the output's length (`rescaled_change`)."""
    norm = lm.mlp_post_norm(layer)
    if norm is None:
        return delta
    return rescaled_change(norm, projection_outputs_at(lm, layer, bare), delta)


def value_stats(requests: list[EditRequest], target: TargetValues) -> dict:
    """How far each edit's target value went and whether it converged."""
    nll, ratio = target.nll.float(), target.delta_ratio.float()
    return {"delta_norm": float(target.delta.norm(dim=1).mean()),
            "value_nll_mean": float(nll.mean()), "value_nll_max": float(nll.max()),
            "delta_ratio_mean": float(ratio.mean()), "delta_ratio_max": float(ratio.max()),
            "value_steps_mean": float(target.steps.float().mean()),
            "edits": [{"case_id": r.case_id, "value_nll": float(n), "delta_ratio": float(q),
                       "value_steps": int(s), "value_converged": bool(c),
                       # the margin only where it was scored (NaN ≠ NaN in a summary)
                       **({"value_margin": float(m)} if m == m else {})}
                      for r, n, q, s, m, c in zip(requests, nll, ratio, target.steps,
                                                  target.margin, target.converged)]}


def _key_value_batch(lm, editor, requests, templates, layers, value_args,
                     key_args, avoid=None) -> tuple[dict, dict]:
    """Keys and target values, the residual spread over `layers` as MEMIT does (layer i of
    n takes 1/(n-i) of what is still missing at the last layer). Returns the step's stats
    and what each layer was asked: {layer: (keys [R, d_k], values [R, d_v], edit of each
    row [R])}."""
    device = lm.model.device
    clock = PhaseClock()
    with clock("values"):
        rewrite, groups = rewrite_batch(lm.tokenizer, requests, templates)
        rewrite, groups = rewrite.to(device), groups.to(device)
        kl = kl_batch(lm.tokenizer, requests).to(device)
        truth = None
        if value_args.stop_on == "margin":   # the true answers, to see the margin
            truth = rewrite_batch(lm.tokenizer, requests, templates, "ground_truth")[0].to(device)
        avoid = avoid or {}
        target = compute_target_values(lm, layers[-1], rewrite, groups, kl, value_args, truth,
                                       avoid=avoid.get(layers[-1]))
    bare = prompt_batch(lm.tokenizer, requests).to(device)
    stats, rows = value_stats(requests, target), {}
    z_now = target.stream_init
    for i, layer in enumerate(layers):
        with clock("keys"):
            if i > 0:
                z_now = block_outputs_at(lm, layers[-1], bare)
            keys, key_edits = compute_keys(lm, layer, rewrite, groups, len(requests),
                                           key_args.mode)                # [R, d_k], [R]
            if len(layers) == 1:   # the optimised change, or its equal behind a norm: exact
                change = single_layer_change(lm, layer, bare, target.delta)
            else:
                change = layer_change(lm, layer, bare,
                                      (target.stream_target - z_now) / (len(layers) - i))
        clock.start("update")
        W = editor.weight(layer)
        keys, asked = keys.to(W.dtype), change.to(W.dtype)[key_edits]   # asked: V − K W
        if value_args.avoid_on == "writes" and layer in avoid:
            project_out(asked, avoid[layer].to(asked))
        values = keys @ W + asked                                         # [R, d_v]
        delta_W = _update_layer(lm, editor, layer, keys, values, requests)
        rows[layer] = (keys, values, key_edits)
        stats[f"update_norm_L{layer}"] = float(delta_W.norm())
        stats[f"written_share_L{layer}"] = float((keys @ delta_W).norm()
                                                 / asked.norm().clamp_min(1e-30))
        clock.stop("update")
    return {**stats, **clock.stats()}, rows


def _update_layer(lm, editor, layer: int, keys: torch.Tensor, values: torch.Tensor,
                  requests: list[EditRequest]) -> torch.Tensor:
    """The editor's update of `layer` towards `values` [R, d_v] at `keys` [R, d_k], written
    into the model; returns ΔW [d_k, d_v]."""
    try:
        delta_W = editor.update(layer, keys, values)
    except ValueError as err:
        raise EditBatchError(f"edits with case_id {[r.case_id for r in requests]} at "
                             f"layer {layer}: {err}. The model's last checkpoint is "
                             f"untouched; the run stops here.") from err
    lm.write_edit_weight(layer, editor.weight(layer))
    return delta_W


def _fine_tune_batch(lm, editor, requests, layers) -> dict[str, float]:
    """The loss editor's update on the mean teacher-forced NLL of " target_new" after each
    bare edit prompt."""
    batch, _ = rewrite_batch(lm.tokenizer, requests, ["{}"])
    batch = batch.to(lm.model.device)
    rows, positions = batch.target_positions
    labels = batch.labels[rows, positions]
    linears = {layer: lm.mlp_out(layer) for layer in layers}

    def loss_of(weights: dict[int, torch.Tensor]) -> torch.Tensor:
        with replace_linear_weights(linears, weights):
            hidden = lm.model.base_model(input_ids=batch.input_ids,
                                         attention_mask=batch.attention_mask,
                                         use_cache=False).last_hidden_state
        logp = F.log_softmax(vocab_logits(lm.model, hidden[rows, positions]), -1)
        token_nll = -logp.gather(1, labels[:, None])                         # [M, 1]
        return group_mean(token_nll, rows, len(requests)).mean()

    clock = PhaseClock()
    with clock("update"):   # the fine-tuning steps are the whole edit
        deltas = editor.update(loss_of)
        for layer in layers:
            lm.write_edit_weight(layer, editor.weight(layer))
    stats = {"ft_loss": editor.last_loss}
    stats.update({f"update_norm_L{layer}": float(d.norm()) for layer, d in deltas.items()})
    return {**stats, **clock.stats()}
