"""Target values: the residual-stream vector z that makes the model say `target_new`.

As in MEMIT's `compute_z`: one delta per edit acts at block `z_layer` at the subject's
last token of every prefixed prompt, and is optimised with Adam (or, with `optimizer: ngd`,
normalized gradient descent) so that the prompts continue with `target_new`, with a KL
term that keeps the distribution after "{subject} is a", a weight decay on the delta and a
norm clamp; an edit stops once its loss is small. The delta lives at the output of the
block's edited projection, the space the editor writes (`write_space.py`): on Llama-style
blocks that is the residual stream itself, on Gemma-2/3 it passes through the post-MLP norm
before it reaches the stream.

Hot path (docs/benchmarks.md measures each step):
- each row is cut at its subject's last token; the prefix before it cannot see the delta,
  so it goes through the model once (once per distinct prefix) and enters every step as a
  key/value cache;
- one no-grad pass over the suffixes records the residual stream after block `z_layer`
  and the keyword arguments every later block is called with (mask, rotary embeddings),
  without running the later blocks;
- each Adam step replays only blocks `z_layer+1 ..` on that stream plus the delta, and
  projects to the vocabulary only at the positions that are scored;
- edits are optimised in buckets of similar suffix length; converged edits leave the batch;
- the margin stop's one-token ground truths are read from the target_new rows' logits.
No parameter needs a gradient; only the deltas do.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from tasks.extract.hooks import first_tensor, record_instead, run_until
from tasks.extract.keys import group_mean
from tasks.extract.tokens import TokenBatch
from tasks.extract.write_space import stream_change
from tasks.models import vocab_logits


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX (Linux flags); elsewhere bfloat16 would be emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bfloat16()


@functools.cache
def _cpu_has_bfloat16() -> bool:
    """AVX512-BF16 or AMX among this CPU's flags (read once; False where unreadable)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass
class ValueArgs:
    """Hyper-parameters of the target-value optimisation (published values noted)."""

    steps: int = 25               # MEMIT/AlphaEdit: 20-25 Adam steps
    lr: float = 0.5               # AlphaEdit Llama3-8B: v_lr 0.1; EasyEdit Llama: 0.5
    kl_factor: float = 0.0625     # MEMIT
    weight_decay: float = 0.5     # MEMIT/AlphaEdit Llama3-8B: v_weight_decay 0.5
    decay_form: str = "memit"     # memit: wd·‖δ‖/‖z‖² (MEMIT's compute_z); squared: wd·‖δ‖²/‖z‖²
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ this × ‖z‖; AlphaEdit Llama3: 0.75, EasyEdit Llama: 4
    early_stop: float = 5e-2      # an edit stops once its loss is under this (MEMIT: 5e-2)
    stop_on: str = "nll"          # nll: the target NLL alone; total: NLL + KL + decay (MEMIT),
                                  # slower here (docs/benchmarks.md, "Fidelity sweep");
                                  # margin: target_new beats ground_truth by `margin` on
                                  # every prompt (what efficacy scores), early_stop unused
    margin: float = 2.0           # nats of mean-token log-probability, for stop_on: margin
    overshoot: str = "keep"       # the step that meets the margin stop overshoots it: keep,
    # write that step's delta; interpolate, move the delta back along that step to where the
    # margin, linear between the step's two ends, meets `margin` (its margin then re-scored)
    n_prefixes: int = 5           # MEMIT: 5 sampled prefixes plus the bare prompt
    prefix_tokens: int = 10       # MEMIT: prefixes of 10 tokens
    open_prefixes: int = 0        # how many of them run on into the prompt without MEMIT's
    # ". " (the subject then follows words of its own sentence, as in a third of paraphrases)
    optimizer: str = "adam"       # adam; ngd, normalized gradient descent: each edit's δ moves
    # `ngd_step` × ‖reference‖ against its own gradient per step (the steepest descent in
    # ‖δ‖, where Adam's first steps move every coordinate alike)
    ngd_step: float = 0.10        # 0.10 with a 3-nat margin: Adam's perplexity at 1,000 edits
    # with +2.9 points of generalization (docs/benchmarks.md)
    rewrite_below: float | None = None  # after a batch is written, its edits whose prompt
    # (`rewrite_on`) still prefers target_new by less than this (mean-token nats; efficacy: > 0)
    # have their key/value rows submitted once more, same targets (RLS: weight 2); None: never
    rewrite_on: str = "bare"      # what that margin is read on: bare, the bare prompt (where
    # efficacy is scored); prompts, the least over the prompts the values were optimised on
    # (the bare one and its prefixed copies; never the paraphrases generalization scores)
    autocast: str | None = None   # bfloat16: the Adam steps' replays under torch.autocast
    # (the stream, the clamp and the written delta stay float32); auto: bfloat16 where the
    # device has native bfloat16 matmuls, else none
    avoid_written: int = 0        # the stream projects the top N output directions of what
    # the edits so far wrote (ΔW = W − W0) out of every new delta (`avoid_on: delta`, at the
    # value layer) or also out of the change each layer is asked to write (`writes`, each
    # layer's own directions): a direction shared by many edits adds up and costs held-out
    # perplexity (docs/benchmarks.md, "One shared direction")
    avoid_on: str = "delta"

    def __post_init__(self):
        if self.decay_form not in ("memit", "squared"):
            raise ValueError(f"values.decay_form must be memit or squared, got {self.decay_form!r}")
        if self.stop_on not in ("total", "nll", "margin"):
            raise ValueError(f"values.stop_on must be total, nll or margin, got {self.stop_on!r}")
        if self.overshoot not in ("keep", "interpolate"):
            raise ValueError(f"values.overshoot must be keep or interpolate, got {self.overshoot!r}")
        if self.overshoot == "interpolate" and self.stop_on != "margin":
            raise ValueError("values.overshoot: interpolate needs values.stop_on: margin")
        if self.optimizer not in ("adam", "ngd"):
            raise ValueError(f"values.optimizer must be adam or ngd, got {self.optimizer!r}")
        if self.rewrite_on not in ("bare", "prompts"):
            raise ValueError(f"values.rewrite_on must be bare or prompts, got {self.rewrite_on!r}")
        if self.avoid_on not in ("delta", "writes"):
            raise ValueError(f"values.avoid_on must be delta or writes, got {self.avoid_on!r}")
        if not isinstance(self.avoid_written, int) or self.avoid_written < 0:
            raise ValueError("values.avoid_written must be a whole number of directions >= 0, "
                             f"got {self.avoid_written!r}")
        if not isinstance(self.open_prefixes, int) or not 0 <= self.open_prefixes <= self.n_prefixes:
            raise ValueError(f"values.open_prefixes must be a whole number from 0 to n_prefixes "
                             f"({self.n_prefixes}), got {self.open_prefixes!r}")
        if self.autocast not in (None, "auto", "bfloat16", "float16"):
            raise ValueError("values.autocast must be null, auto, bfloat16 or float16, "
                             f"got {self.autocast!r}")

    def replay_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype the Adam steps' replays run in on `device` (None: float32)."""
        if self.autocast == "auto":
            return torch.bfloat16 if native_bfloat16(device) else None
        return self.autocast and getattr(torch, self.autocast)

    def precision(self, device: torch.device):
        """The autocast context of the Adam steps' replays (a no-op when `autocast` is null).
        On CPU attention takes the math kernel there: the fused kernel's backward in
        bfloat16 costs more than the matmuls save (docs/benchmarks.md)."""
        dtype = self.replay_dtype(device)
        if dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def decay(self, delta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Weight decay [E] of deltas [E, d] against the reference vectors ref [E, d]."""
        ref_sq = ref.pow(2).sum(1)
        if self.decay_form == "memit":
            return self.weight_decay * delta.norm(dim=1) / ref_sq
        return self.weight_decay * delta.pow(2).sum(1) / ref_sq


@dataclass
class TargetValues:
    """What the value optimisation asks of each edit E, at the bare prompt's subject token.

    `delta` [E, d] is the change at the edited projection's output; `stream_target` [E, d]
    the residual stream after block z_layer it makes (z, MEMIT's target); `stream_init`
    [E, d] that stream before the edit; `nll` [E] the final target NLL (mean over prompts),
    `delta_ratio` [E] ‖δ‖ / ‖reference‖, the fraction of the clamp's reference used,
    `steps` [E] the Adam steps the edit took before it stopped and `margin` [E] its final
    smallest NLL(ground_truth) − NLL(target_new) over prompts (NaN without truth rows);
    `converged` [E] is 1 where the stop rule ended the edit, 0 where the steps ran out."""

    delta: torch.Tensor
    stream_target: torch.Tensor
    stream_init: torch.Tensor
    nll: torch.Tensor
    delta_ratio: torch.Tensor
    steps: torch.Tensor
    margin: torch.Tensor
    converged: torch.Tensor

    @classmethod
    def empty(cls, n_edits: int, width: int, like: torch.Tensor) -> "TargetValues":
        new = lambda *shape: torch.empty(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
        return cls(new(n_edits, width), new(n_edits, width), new(n_edits, width),
                   new(n_edits), new(n_edits), new(n_edits), new(n_edits), new(n_edits))

    def put(self, edits: torch.Tensor, part: "TargetValues") -> None:
        for name in ("delta", "stream_target", "stream_init", "nll", "delta_ratio", "steps",
                     "margin", "converged"):
            getattr(self, name)[edits] = getattr(part, name)


def _select_rows(value, rows: torch.Tensor, batch_size: int):
    """Index every tensor in `value` (nested tuples/dicts) whose first dim is the batch."""
    if torch.is_tensor(value):
        if value.dim() >= 2 and value.shape[0] == batch_size:
            return value[rows]
        return value
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, batch_size) for v in value)
    if isinstance(value, list):
        return [_select_rows(v, rows, batch_size) for v in value]
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, batch_size) for k, v in value.items()}
    return value


def split_at_lookup(batch: TokenBatch):
    """Cut each row at its lookup token: a left-padded prefix (unaffected by a delta injected
    at the lookup) and a right-padded suffix starting at the lookup.

    Returns (prefix_ids [B, P], prefix_mask [B, P], prefix_pos [B, P], suffix TokenBatch with
    lookup 0 and positions shifted by each row's lookup, suffix_pos [B, S]).
    """
    lookup, lengths = batch.lookup, batch.last + 1
    assert (lookup >= 0).all(), "every row needs a lookup position"
    n, prefix_len = len(lookup), int(lookup.max())
    suffix_len = int((lengths - lookup).max())
    cols_p = torch.arange(prefix_len, device=lookup.device)
    cols_s = torch.arange(suffix_len, device=lookup.device)
    src_p = cols_p[None, :] - (prefix_len - lookup[:, None])     # source column, <0 = pad
    src_s = lookup[:, None] + cols_s[None, :]
    mask_p = (src_p >= 0).long()
    mask_s = (src_s < lengths[:, None]).long()
    rows = torch.arange(n, device=lookup.device)[:, None]

    def take(x, src, mask, fill):
        picked = x[rows, src.clamp(0, x.shape[1] - 1)]
        return torch.where(mask.bool(), picked, torch.full_like(picked, fill))

    prefix_ids = take(batch.input_ids, src_p, mask_p, 0)
    suffix = TokenBatch(
        input_ids=take(batch.input_ids, src_s, mask_s, 0), attention_mask=mask_s,
        lookup=torch.zeros_like(lookup), labels=take(batch.labels, src_s, mask_s, -100),
        last=lengths - lookup - 1)
    return prefix_ids, mask_p, src_p.clamp(min=0), suffix, src_s


class LayerReplay:
    """Runs blocks `layer+1 ..`, the final norm and the LM head on a cached residual stream.

    Only each row's suffix (lookup token onwards) is replayed; the prefix is computed once
    and enters as a key/value cache, since a delta at the lookup cannot change it.
    """

    def __init__(self, lm, layer: int, batch: TokenBatch, dtype: torch.dtype | None = None):
        self.lm, self.layer, self.batch_size = lm, layer, batch.input_ids.shape[0]
        self.later = list(range(layer + 1, lm.num_layers))
        prefix_ids, prefix_mask, prefix_pos, self.suffix, suffix_pos = split_at_lookup(batch)
        self.post_norm = lm.mlp_post_norm(layer)
        with torch.no_grad():
            cache = self._prefix_cache(prefix_ids, prefix_mask, prefix_pos)
            self._record_suffix(prefix_mask, suffix_pos, cache)
        base = lm.model.base_model
        norm = getattr(base, "norm", None) or getattr(base, "final_layernorm")
        # The modules `logits` runs: the model's own, or copies in `dtype` (one cast per
        # replay instead of one per step under autocast, which recasts frozen weights).
        self.blocks = [lm.block(i) for i in self.later] + [norm, lm.model.get_output_embeddings()]
        if dtype is not None:
            self.blocks = [copy.deepcopy(m).to(dtype) for m in self.blocks]

    def _prefix_cache(self, prefix_ids, prefix_mask, prefix_pos):
        """The prefixes through the whole model: their keys/values for the later blocks
        (`self.prefix_kv`), and the cache the suffix pass continues. Rows with the same
        prefix (a ground-truth row and its target_new row) go through once."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.model.config)
        self.prefix_kv = {}
        self.prefix_of = torch.zeros(len(prefix_ids), dtype=torch.long, device=prefix_ids.device)
        if prefix_ids.shape[1] == 0:
            return cache
        _, row_of = torch.unique(torch.cat([prefix_ids, prefix_mask], 1), dim=0,
                                 return_inverse=True)                      # [B] -> unique
        rows = torch.arange(len(row_of), device=row_of.device)
        first = torch.full((int(row_of.max()) + 1,), len(row_of), device=row_of.device)
        first = first.scatter_reduce(0, row_of, rows, "amin")             # a row per prefix
        self.lm.model.base_model(input_ids=prefix_ids[first], attention_mask=prefix_mask[first],
                                 position_ids=prefix_pos[first], past_key_values=cache,
                                 use_cache=True)
        cache.reorder_cache(row_of)                                       # back to [B, ...]
        self.prefix_of = row_of   # [B]: rows with equal values share their prefix
        # Fully padded prefixes would leave NaNs in masked slots, which a zero attention
        # weight would still spread.
        self.prefix_kv = {i: tuple(torch.nan_to_num(t) for t in
                                   (cache.layers[i].keys, cache.layers[i].values))
                          for i in self.later}
        return cache

    def _record_suffix(self, prefix_mask, suffix_pos, cache) -> None:
        """The suffixes up to block `layer`: the stream after it [B, S, d], the edited
        projection's output at the lookup [B, d], and the keyword arguments (mask, rotary
        embeddings) each later block is called with, which the later blocks do not compute."""
        store: dict = {}

        def keep_stream(_m, _inputs, output):
            store["stream"] = first_tensor(output).detach()

        def keep_projection(_m, _inputs, output):
            store["projection"] = output[:, 0].detach()   # the lookup: suffix position 0

        handles = [self.lm.block(self.layer).register_forward_hook(keep_stream),
                   self.lm.mlp_out(self.layer).register_forward_hook(keep_projection)]
        try:
            with record_instead([self.lm.block(i) for i in self.later]) as calls:
                run_until(self.lm.model.base_model, input_ids=self.suffix.input_ids,
                          position_ids=suffix_pos, past_key_values=cache, use_cache=True,
                          attention_mask=torch.cat([prefix_mask, self.suffix.attention_mask], 1))
        finally:
            for h in handles:
                h.remove()
        self.block_kwargs: list[dict] = calls
        self.stream = store["stream"]
        self.projection = store["projection"]

    def _cache(self, keep_rows: torch.Tensor | None):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.model.config)
        for i, (keys, values) in self.prefix_kv.items():
            if keep_rows is not None:
                keys, values = keys[keep_rows], values[keep_rows]
            cache.update(keys, values, i)
        return cache

    def logits(self, stream: torch.Tensor, rows: torch.Tensor,
               positions: torch.Tensor, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run the later blocks on `stream` [b, S, d] (rows `keep_rows` of the batch) and
        return logits [M, vocab] at (`rows`, `positions`) of that sub-batch (suffix frame)."""
        hidden = stream
        cache = self._cache(keep_rows)
        *blocks, norm, head = self.blocks
        for block, kwargs in zip(blocks, self.block_kwargs):
            if keep_rows is not None:
                kwargs = _select_rows(kwargs, keep_rows, self.batch_size)
            kwargs = {**kwargs, "past_key_values": cache}
            hidden = first_tensor(block(hidden, **kwargs))
        return vocab_logits(self.lm.model, norm(hidden[rows, positions]), head)

    def shifted_stream(self, delta_rows: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
        """The stream [b, S, d] of rows `keep_rows` with the projection's output at each
        row's lookup (suffix position 0) moved by `delta_rows` [b, d]."""
        change = stream_change(self.post_norm, self.projection[keep_rows], delta_rows)
        stream = self.stream[keep_rows]
        return torch.cat([stream[:, :1] + change[:, None].to(stream.dtype), stream[:, 1:]], 1)


def compute_target_values(lm, z_layer: int, rewrite: TokenBatch, rewrite_groups: torch.Tensor,
                          kl: TokenBatch, args: ValueArgs,
                          truth: TokenBatch | None = None,
                          init: torch.Tensor | None = None,
                          avoid: torch.Tensor | None = None) -> TargetValues:
    """Optimise one delta per edit at block `z_layer`'s edited projection.

    `rewrite` rows are prefixed prompts + target (edit of row b: `rewrite_groups[b]`, rows of
    one edit contiguous, the first row of each edit the bare prompt); `kl` has one
    "{subject} is a" row per edit; `truth` (needed by `stop_on: margin`) the rewrite rows
    with ground_truth as the answer, row for row; `init` [d] where every delta starts (None:
    zero; clamped like a step); `avoid` [r, d] orthonormal directions every delta is kept
    orthogonal to (`written_directions`). Returns `TargetValues` over the E edits.

    Edits do not interact (own delta, own loss, element-wise Adam), so they are optimised
    in buckets of similar suffix length: a batch is only as wide as its longest suffix.
    """
    n_edits = kl.input_ids.shape[0]
    suffix_len = torch.zeros(n_edits, dtype=torch.long, device=rewrite_groups.device)
    suffix_len.scatter_reduce_(0, rewrite_groups, rewrite.last - rewrite.lookup + 1, "amax")
    like = torch.empty(0, device=kl.input_ids.device, dtype=lm.model.dtype)
    result = TargetValues.empty(n_edits, lm.model.config.hidden_size, like)
    if args.stop_on == "margin" and truth is None:
        raise ValueError("values.stop_on: margin needs the ground-truth rows (truth)")
    if truth is not None:   # a suffix holds the answer: the longer of the two counts
        suffix_len.scatter_reduce_(0, rewrite_groups, truth.last - truth.lookup + 1, "amax")
    for bucket in length_buckets(suffix_len.tolist(), rows_per_edit=len(rewrite_groups) // n_edits):
        edits = torch.tensor(bucket, device=rewrite_groups.device)
        rows = torch.nonzero(torch.isin(rewrite_groups, edits)).squeeze(1)
        local = torch.searchsorted(edits, rewrite_groups[rows])   # edit ids -> 0..len(bucket)-1
        result.put(edits, _optimise_deltas(lm, z_layer, rewrite.select(rows), local,
                                           kl.select(edits), args,
                                           None if truth is None else truth.select(rows), init,
                                           avoid))
    return result


def length_buckets(lengths: list[int], rows_per_edit: int, row_overhead: int = 8) -> list[list[int]]:
    """Split edits (sorted by suffix length) into contiguous buckets minimising
    Σ rows × longest suffix, plus `row_overhead` row-equivalents per extra bucket."""
    order = sorted(range(len(lengths)), key=lambda e: lengths[e])
    n = len(order)
    best = [0.0] + [float("inf")] * n   # best[i]: cost of the first i edits
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        width = lengths[order[end - 1]]   # the longest suffix of any bucket ending here
        for start in range(end):
            cost = best[start] + (end - start) * rows_per_edit * width + row_overhead * width
            if cost < best[end]:
                best[end], cut[end] = cost, start
    buckets, end = [], n
    while end > 0:
        buckets.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return buckets[::-1]


class _DeltaLoss:
    """The per-edit loss of a bucket's deltas: target NLL over an edit's prompts, KL at its
    "{subject} is a" row, weight decay. Rows of the replay: rewrite rows, KL rows, then
    (when given) the truth rows, row for row the rewrite rows' prompts, which only score
    the margin."""

    def __init__(self, replay: LayerReplay, groups: torch.Tensor, is_kl: torch.Tensor,
                 is_truth: torch.Tensor, n_edits: int, ref: torch.Tensor, args: ValueArgs):
        self.replay, self.groups, self.is_kl, self.n_edits = replay, groups, is_kl, n_edits
        self.is_truth, self.ref, self.args = is_truth, ref, args
        self.rows = torch.arange(len(groups), device=groups.device)
        suffix = replay.suffix
        with torch.no_grad():
            kl_rows = self.rows[is_kl]   # replayed alone: [k, vocab]
            self.kl_init = F.log_softmax(replay.logits(
                replay.stream[kl_rows], torch.arange(len(kl_rows), device=kl_rows.device),
                suffix.last[kl_rows], keep_rows=kl_rows), -1)
        self.truth_from, self.truth_token = self._one_token_truths()

    def _one_token_truths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(source [B], token [B]). A truth row whose answer is one token and whose tokens
        before it are its target_new row's needs no forward of its own: that row's logits
        at the answer predict both first tokens. `source` holds, at such a truth row, its
        target_new row (-1 elsewhere); `token`, at that target_new row, the truth's token."""
        source, token = torch.full_like(self.rows, -1), torch.zeros_like(self.rows)
        if not self.is_truth.any():
            return source, token
        suffix, prefix_of = self.replay.suffix, self.replay.prefix_of
        truth, new = self.rows[self.is_truth], self.rows[~self.is_truth & ~self.is_kl]
        answer_at = (suffix.labels != -100).int().argmax(1)               # [B] first label
        at = answer_at[truth]
        cols = torch.arange(suffix.input_ids.shape[1], device=at.device)[None, :]
        before = cols <= at[:, None]
        same = (((suffix.input_ids[truth] == suffix.input_ids[new]) | ~before).all(1)
                & (at == answer_at[new]) & (prefix_of[truth] == prefix_of[new])
                & ((suffix.labels[truth] != -100).sum(1) == 1))
        source[truth[same]] = new[same]
        token[new[same]] = suffix.labels[truth[same], at[same]]
        return source, token

    def row_nll(self, delta: torch.Tensor, keep_rows: torch.Tensor):
        """Rows `keep_rows` replayed under deltas [E, d]: their mean-token NLL [b, 1] (0 for
        rows without labels), the log-probabilities [k, vocab] at the KL rows among them,
        those rows' places k in `keep_rows`, and each row's log-probability [b, 1] of
        `truth_token` at its first answer position (detached; meaningless but for the
        sources of `truth_from`)."""
        suffix = self.replay.suffix
        stream = self.replay.shifted_stream(delta[self.groups[keep_rows]], keep_rows)
        labels = suffix.labels[keep_rows]
        t_rows, t_pos = torch.nonzero(labels != -100, as_tuple=True)
        k_rows = torch.nonzero(self.is_kl[keep_rows]).squeeze(1)
        logits = self.replay.logits(stream, torch.cat([t_rows, k_rows]),
                                    torch.cat([t_pos, suffix.last[keep_rows][k_rows]]),
                                    keep_rows=keep_rows)
        target_logp = F.log_softmax(logits[: len(t_rows)], -1)
        token_nll = -target_logp.gather(1, labels[t_rows, t_pos][:, None])       # [M, 1]
        row_nll = group_mean(token_nll, t_rows, len(keep_rows))                  # [b, 1]
        first = torch.searchsorted(t_rows, torch.arange(len(keep_rows), device=t_rows.device))
        first_logp = target_logp.detach()[first.clamp(max=max(len(t_rows) - 1, 0))]
        truth_logp = first_logp.gather(1, self.truth_token[keep_rows][:, None])
        return row_nll, F.log_softmax(logits[len(t_rows):], -1), k_rows, truth_logp

    def truth_nll(self, delta: torch.Tensor, truth_rows: torch.Tensor, keep_rows: torch.Tensor,
                  truth_logp: torch.Tensor) -> torch.Tensor:
        """Mean-token NLL [t, 1] of `truth_rows` under deltas [E, d]: read from their
        target_new rows' `truth_logp` (`row_nll` of `keep_rows`) where `truth_from` allows,
        replayed for the rest."""
        source = self.truth_from[truth_rows]
        shared = source >= 0
        place = torch.full_like(self.rows, -1)
        place[keep_rows] = torch.arange(len(keep_rows), device=keep_rows.device)
        nll = torch.empty(len(truth_rows), 1, dtype=truth_logp.dtype, device=truth_logp.device)
        nll[shared] = -truth_logp[place[source[shared]]]
        if not shared.all():
            nll[~shared] = self.row_nll(delta, truth_rows[~shared])[0].to(nll.dtype)
        return nll

    def __call__(self, delta: torch.Tensor, active: torch.Tensor):
        """(loss [E], target NLL [E], margin [E] or None) for deltas [E, d], computed on
        active edits' rows. The margin is the smallest, over an edit's prompts, of
        NLL(ground_truth) − NLL(target_new) (mean-token, as efficacy compares them); the
        truth rows only score it, so they run without a graph."""
        active_rows = active[self.groups]
        keep_rows = self.rows[active_rows & ~self.is_truth]
        sub_groups, sub_new = self.groups[keep_rows], ~self.is_kl[keep_rows]
        row_nll, kl_logp, k_rows, truth_logp = self.row_nll(delta, keep_rows)
        nll = group_mean(row_nll[sub_new], sub_groups[sub_new], self.n_edits).squeeze(1)  # [E]
        kl_edits = sub_groups[k_rows]
        kl_div = torch.zeros(self.n_edits, device=delta.device, dtype=kl_logp.dtype).index_add(
            0, kl_edits, (kl_logp.exp() * (kl_logp - self.kl_init[kl_edits])).sum(-1))
        loss = nll + self.args.kl_factor * kl_div + self.args.decay(delta, self.ref)
        truth_rows = self.rows[active_rows & self.is_truth]
        if len(truth_rows) == 0:
            return loss, nll, None
        with torch.no_grad():   # truth rows pair with the new-target rows in the same order
            truth_nll = self.truth_nll(delta, truth_rows, keep_rows, truth_logp)
            gap = (truth_nll - row_nll[sub_new].detach()).squeeze(1)
        margin = torch.full((self.n_edits,), float("inf"), device=gap.device,
                            dtype=gap.dtype).scatter_reduce(0, sub_groups[sub_new], gap, "amin")
        return loss, nll, margin


def _optimise_deltas(lm, z_layer: int, rewrite: TokenBatch, rewrite_groups: torch.Tensor,
                     kl: TokenBatch, args: ValueArgs,
                     truth: TokenBatch | None = None,
                     init: torch.Tensor | None = None,
                     avoid: torch.Tensor | None = None) -> TargetValues:
    """compute_target_values on one bucket (same arguments and result).

    The clamp and the decay measure δ against the space it lives in: the residual stream
    (MEMIT's ‖z‖) where the projection adds to it directly, the projection's own output
    behind a post-MLP norm (whose scale the stream never sees)."""
    n_edits = kl.input_ids.shape[0]
    # One replay over rewrite, KL (and truth) rows together, padded to one width.
    parts = [rewrite, kl] + ([truth] if truth is not None else [])
    joint = _concat(parts, max(part.input_ids.shape[1] for part in parts))
    replay = LayerReplay(lm, z_layer, joint, args.replay_dtype(joint.input_ids.device))
    device = joint.input_ids.device
    kinds = torch.cat([torch.full((part.input_ids.shape[0],), kind, device=device)
                       for kind, part in enumerate(parts)])                  # 0, 1, 2
    groups = torch.cat([rewrite_groups.to(device), torch.arange(n_edits, device=device)]
                       + ([rewrite_groups.to(device)] if truth is not None else []))
    first_row = torch.searchsorted(rewrite_groups.to(device).contiguous(),
                                   torch.arange(n_edits, device=device))
    stream_init = replay.stream[first_row, 0]                               # [E, d]
    ref = stream_init if replay.post_norm is None else replay.projection[first_row]
    with args.precision(device):
        loss_of = _DeltaLoss(replay, groups, kinds == 1, kinds == 2, n_edits, ref, args)

    delta = torch.zeros_like(ref) if init is None else init.to(ref).expand_as(ref).clone()
    delta, nll, margin, steps, converged = _run_steps(loss_of, delta, ref.norm(dim=1), args,
                                                      avoid)
    with torch.no_grad():
        change = stream_change(replay.post_norm, replay.projection[first_row], delta)
    return TargetValues(delta=delta, stream_target=stream_init + change.to(stream_init.dtype),
                        stream_init=stream_init, nll=nll,
                        delta_ratio=delta.norm(dim=1) / ref.norm(dim=1), steps=steps,
                        margin=margin, converged=converged)


def _run_steps(loss_of: _DeltaLoss, delta: torch.Tensor, ref_norm: torch.Tensor,
               args: ValueArgs, avoid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """`args.optimizer` (Adam or normalized gradient descent) on the deltas [E, d] from where
    they start (clamped like a step, and like every step kept orthogonal to `avoid` [r, d])
    until each edit meets the stop rule or the steps run out; `ref_norm` [E] is
    ‖reference‖, the unit of the clamp and of the normalized step.
    Returns the written deltas [E, d] (with `overshoot: interpolate`, moved back along their
    last step) and, per edit [E], the target NLL and margin they score, the steps taken and 1
    where the stop rule ended the edit (0 where the steps ran out)."""
    n_edits, device = delta.shape[0], delta.device
    max_norm = args.clamp_norm_factor * ref_norm                            # [E]
    avoid = None if avoid is None else avoid.to(delta)
    project_out(delta, avoid)
    clamp_rows(delta, max_norm)
    delta.requires_grad_(True)
    opt = (torch.optim.Adam([delta], lr=args.lr) if args.optimizer == "adam"
           else NormalizedGradient(delta, args.ngd_step * ref_norm))
    active = torch.ones(n_edits, dtype=torch.bool, device=device)
    final_nll = torch.zeros(n_edits, device=device)
    final_margin = torch.full((n_edits,), float("nan"), device=device)
    steps = torch.zeros(n_edits, device=device)
    landed = torch.zeros(n_edits, dtype=torch.bool, device=device)
    landing = torch.zeros_like(delta.detach())   # where the `landed` rows end
    before = None                          # (δ, margin) where the last step started
    for step in range(args.steps + 1):     # the last pass only scores the last step
        with args.precision(device):
            loss, nll, margin = loss_of(delta, active)
        final_nll[active] = nll.detach()[active].to(final_nll.dtype)
        if margin is not None:
            final_margin[active] = margin[active].to(final_margin.dtype)
        running = _still_running(args, active, loss, nll, margin)
        if before is not None:
            landed |= _land_on_margin(landing, delta.detach(), *before, margin,
                                      active & ~running, args.margin)
        active = running
        if not active.any() or step == args.steps:
            break
        steps += active
        if args.overshoot == "interpolate":
            before = (delta.detach().clone(), margin.detach())
        _take_step(opt, delta, loss, active, max_norm, avoid)
    delta = delta.detach()
    if landed.any():   # written where they landed, and scored there, not at the step's end
        delta[landed] = landing[landed]
        with torch.no_grad(), args.precision(device):
            _, nll, margin = loss_of(delta, landed)
        final_nll[landed] = nll[landed].to(final_nll.dtype)
        final_margin[landed] = margin[landed].to(final_margin.dtype)
    return delta, final_nll, final_margin, steps, (~active).to(steps.dtype)


def _still_running(args: ValueArgs, active: torch.Tensor, loss: torch.Tensor,
                   nll: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    """[E] bool: the edits of `active` that have not met the stop rule yet (a margin on
    every prompt, the total loss or the target NLL under `args.early_stop`)."""
    if args.stop_on == "margin":
        return active & ~(margin >= args.margin)
    stop_value = loss if args.stop_on == "total" else nll
    return active & ~(stop_value.detach() < args.early_stop)


def _land_on_margin(landing: torch.Tensor, end: torch.Tensor, start: torch.Tensor,
                    start_margin: torch.Tensor, end_margin: torch.Tensor,
                    stopped: torch.Tensor, wanted: float) -> torch.Tensor:
    """For the rows the last step took from δ `start` [E, d] (margin `start_margin` [E],
    below `wanted`) to `end` past it, write into `landing` [E, d] the point start +
    t (end − start) where the margin, linear in t, meets `wanted`. Both ends lie in the
    clamp's ball, so the landing does too. A stopped row was still running where the step
    started, so end_margin ≥ wanted > start_margin there. Returns `stopped`, the rows written."""
    gap = end_margin[stopped] - start_margin[stopped]
    t = ((wanted - start_margin[stopped]) / gap).clamp(0, 1).to(end.dtype)
    landing[stopped] = start[stopped] + t[:, None] * (end[stopped] - start[stopped])
    return stopped


def _take_step(opt: torch.optim.Optimizer, delta: torch.Tensor, loss: torch.Tensor,
               active: torch.Tensor, max_norm: torch.Tensor,
               avoid: torch.Tensor | None = None) -> None:
    """One step of `opt` on the rows of δ [E, d] still `active`, along the gradient with its
    part in `avoid` [r, d] taken out (and δ's, which Adam's per-coordinate steps bring back);
    the stopped rows keep their value (Adam's moments would move them); every row is then
    clamped to `max_norm` [E]."""
    frozen = delta.detach().clone()
    opt.zero_grad()
    loss[active].sum().backward()
    project_out(delta.grad, avoid)
    opt.step()
    with torch.no_grad():
        delta[~active] = frozen[~active]
        project_out(delta, avoid)
        clamp_rows(delta, max_norm)


@torch.no_grad()
def project_out(x: torch.Tensor, avoid: torch.Tensor | None) -> None:
    """Remove from each row of x [E, d], in place, its part in the span of the orthonormal
    rows of `avoid` [r, d] (nothing when None)."""
    if avoid is not None:
        x.sub_((x @ avoid.T) @ avoid)


def written_directions(change: torch.Tensor, n: int) -> torch.Tensor | None:
    """The n output directions [n, d_v] (orthonormal, float64) along which a layer's change
    ΔW [d_k, d_v] writes most: its top right singular vectors, the top eigenvectors of
    ΔWᵀΔW [d_v, d_v] (a quarter of the SVD's time); None when n is 0 or ΔW is 0."""
    if n == 0 or not change.any():
        return None
    change = change.double()
    vectors = torch.linalg.eigh(change.T @ change)[1]                 # eigenvalues ascending
    return vectors[:, -n:].flip(1).T.contiguous()


class NormalizedGradient:
    """Steepest descent in ‖δ‖ per edit: row e of δ [E, d] moves `step[e]` against its own
    gradient's direction (`zero_grad`/`step` as a torch optimizer's)."""

    def __init__(self, delta: torch.Tensor, step: torch.Tensor):
        self.delta, self.step_len = delta, step   # step [E]

    def zero_grad(self) -> None:
        self.delta.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grad = self.delta.grad
        unit = grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.delta.sub_(self.step_len[:, None].to(grad.dtype) * unit)


def clamp_rows(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale each row of δ [E, d] down, in place, to at most its `max_norm` [E]."""
    delta.mul_((max_norm / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)[:, None])


def _concat(parts: list[TokenBatch], width: int) -> TokenBatch:
    """The rows of `parts` in order, right-padded to `width` tokens."""
    def padded(name, value):
        return torch.cat([F.pad(getattr(p, name), (0, width - getattr(p, name).shape[1]),
                                value=value) for p in parts])

    return TokenBatch(input_ids=padded("input_ids", 0),
                      attention_mask=padded("attention_mask", 0),
                      lookup=torch.cat([p.lookup for p in parts]),
                      labels=padded("labels", -100),
                      last=torch.cat([p.last for p in parts]))
