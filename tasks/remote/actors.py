"""Ray actors of the grid: one editor actor per cell, evaluator actors per model.

`EditorActor.run` is a streaming generator: it applies the cell's stream in order, reports
the edits applied after every batch and, at every evaluation point, checkpoints and yields
a snapshot of the edited layers (numpy). The driver owns each yielded event and hands the
snapshot to an evaluator without waiting; editing never waits for evaluation. (Refs
created inside the actor and yielded to the driver could be freed by Ray's reference
counting before the driver read them.) The anchor statistics, large, are an argument of
`run`, not of the constructor: Ray re-runs the constructor of an actor it restarts
(max_restarts) and would have to keep constructor arguments in the object store for that,
while the driver passes `run`'s arguments again on every call.

`Evaluator` loads its base model once; for each snapshot it writes the snapshot's layers
into that model, scores the CounterFact metrics on the edits so far and the retention of
the first ones, perplexity on held-out text and, when asked, the lm-eval capability suite
(`tasks/evaluate/capability.py`, on the same in-memory model), and puts the base weights back.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import astuple

import numpy as np
import ray
import torch

from tasks.anchor import AnchorStats
from tasks.config import from_dict
from tasks.corpus import HeldoutArgs
from tasks.evaluate.capability import (CapabilityArgs, CapabilitySuite, heldout_perplexity,
                                       heldout_suite, suite_key, unedited_capability)
from tasks.evaluate.metrics import aggregate, score_requests
from tasks.models import load_model
from tasks.stream import (EditStream, StreamConfig, scored_evaluation, stream_fluency,
                          stream_requests, unedited_scores)


def _in_actor() -> bool:
    """Whether this object lives in a Ray actor (not a plain object in a driver, which may
    have joined a cluster all the same)."""
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _use_threads() -> None:
    if not _in_actor():   # a plain object: keep torch's default
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(round(cpus))))


def _device() -> str:
    if not _in_actor():
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"


def to_numpy(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: w.detach().cpu().numpy() for name, w in weights.items()}


class EditorActor:
    """Holds one cell's model and editor (`EditStream`) for the whole stream, built at
    the first `run` call."""

    def __init__(self, cfg: dict, baseline: dict):
        _use_threads()
        device = _device() if _in_actor() else cfg.get("device", "auto")
        self.config = from_dict(StreamConfig, {**cfg, "device": device})
        self.baseline = baseline
        self.stream: EditStream | None = None
        # True in an actor Ray restarted after it died (max_restarts): the stream goes on
        # from its checkpoint and the driver counts the restart
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.restarted = bool(context and context.get_actor_id()
                              and context.was_current_actor_reconstructed)

    def open(self, anchor: dict[int, tuple[np.ndarray, int]] | None) -> EditStream:
        """The cell's stream, built at the first call with `anchor` (see `run`) and resumed
        from its checkpoint: a checkpoint that cannot go on stops it here."""
        if self.stream is None:
            stats = None if anchor is None else {
                int(l): AnchorStats(torch.from_numpy(np.array(cov)), count)
                for l, (cov, count) in anchor.items()}
            self.stream = EditStream(self.config, anchor=stats, baseline=self.baseline)
        return self.stream

    def run(self, anchor: dict[int, tuple[np.ndarray, int]] | None):
        """Streams the cell with `anchor` {layer: (K0ᵀK0 [d_k, d_k], token count)} (used
        when the stream is built, at the first call; None: the stream's own, from the disk
        cache or computed here). Yields, in order:
        - when the stream continues from a checkpoint, first {"resumed": True, "restarted",
          "edits", "history"}: whether Ray restarted this actor, and the evaluation points
          passed before (with their speed records), whose snapshots are on disk, so the
          driver can score what a crash left unscored;
        - {"progress": True, "edits"} after each batch that ends between evaluation points;
        - {"edits", "snapshot", "speed"} at each evaluation point (the snapshot is also
          written to the cell's folder before the checkpoint);
        - {"done": True, "summary", "edited"} with the final edited layers.
        Called again after the actor was restarted (max_restarts), it goes on from the
        last checkpoint."""
        stream = self.open(anchor)
        if stream.position or self.restarted:
            yield {"resumed": True, "restarted": self.restarted, "edits": stream.position,
                   "history": stream.state["history"]}
            self.restarted = False
        stream.checkpoint()
        while not stream.done:
            if not stream.step():
                yield {"progress": True, "edits": stream.position}
                continue
            stream.record({})   # speed and step stats; quality metrics: the evaluator's
            stream.save_snapshot()
            stream.checkpoint()
            yield {"edits": stream.position, "snapshot": to_numpy(stream.edited_layers()),
                   "speed": stream.state["history"][-1]}
        final = {}
        if stream.cfg.fluency_samples:
            final["fluency"] = stream_fluency(stream.lm, stream.requests, stream.cfg)
        yield {"done": True, "summary": stream.summary(final),
               "edited": to_numpy(stream.edited_layers())}


class Evaluator:
    """A base model that scores snapshots of edited layers. Usable as a Ray actor or as a
    plain object (`pipelines.reeval` without a cluster)."""

    def __init__(self, model: str, device: str | None = None):
        """`device`: where to load the model (default: the GPU Ray assigned, else the CPU;
        outside Ray, a GPU when there is one)."""
        _use_threads()
        self.model_name = model
        self.lm = load_model(model, device=device or _device())
        self._requests: dict[str, list] = {}
        self._heldout: dict[tuple, CapabilitySuite] = {}
        self._suites: dict[str, CapabilitySuite] = {}
        self._unedited_capability: dict[str, dict] = {}

    def _stream_inputs(self, cfg: dict):
        config = from_dict(StreamConfig, cfg)
        key = (f"{config.data}:{config.offset}:{config.num_edits}:{config.skip_bad_records}:"
               f"{config.neighbours}")
        if key not in self._requests:
            self._requests[key] = stream_requests(config, self.lm.tokenizer)[0]
        return config, self._requests[key]

    def _perplexity(self, heldout: dict) -> float:
        """Held-out token perplexity of the model as it is now (lm-eval's task, built once
        per held-out setting)."""
        args = HeldoutArgs(**heldout)
        key = astuple(args)
        if key not in self._heldout:
            self._heldout[key] = heldout_suite(self.lm, args)
        return heldout_perplexity(self._heldout[key])

    def _suite(self, capability: dict | None) -> CapabilitySuite | None:
        """The suite `capability` selects (built once), or None when it selects none."""
        args = from_dict(CapabilityArgs, capability or {}, where="capability.")
        if not args.enabled:
            return None
        key = suite_key(args)
        if key not in self._suites:
            self._suites[key] = CapabilitySuite(self.lm, args)
            # the unedited reference, taken while the model still holds its base weights
            self._unedited_capability[key] = unedited_capability(self._suites[key],
                                                                 self.model_name)
        return self._suites[key]

    def capability_baseline(self, capability: dict) -> dict[str, float]:
        """The unedited model's capability scores as `cap.<task>.<metric>` (disk-cached)."""
        suite = self._suite(capability)
        return {f"cap.{k}": v for k, v in self._unedited_capability[suite_key(suite.args)].items()}

    def baseline(self, cfg: dict, heldout: dict, capability: dict | None = None) -> dict:
        """The unedited model's scores on a cell's requests (disk-cached), perplexity and,
        when `capability` selects a suite, its scores."""
        config, requests = self._stream_inputs(cfg)
        scores = dict(unedited_scores(self.lm, requests, config))
        scores["perplexity"] = self._perplexity(heldout)
        if self._suite(capability) is not None:
            scores.update(self.capability_baseline(capability))
        return scores

    @contextmanager
    def _weights(self, snapshot: dict[str, np.ndarray]):
        """The base model with `snapshot`'s layers written in, restored on exit."""
        weights = {name: torch.from_numpy(np.array(weight))   # a writable copy
                   for name, weight in snapshot.items()}
        with self.lm.layers_loaded(weights):
            yield

    @torch.no_grad()
    def evaluate(self, cfg: dict, snapshot: dict[str, np.ndarray], n_done: int,
                 heldout: dict, capability: dict | None = None) -> dict:
        """CounterFact metrics after `n_done` edits, retention, perplexity and (when
        `capability` selects a suite) `cap.<task>.<metric>` scores of the snapshot. After
        the last edit, "per_request" holds the scores per request (`scored_evaluation`)."""
        config, requests = self._stream_inputs(cfg)
        suite = self._suite(capability)
        final = n_done == config.num_edits
        with self._weights(snapshot):
            metrics, per_request = scored_evaluation(self.lm, requests, config, n_done, final)
            if final:
                metrics["per_request"] = per_request
            metrics["perplexity"] = self._perplexity(heldout)
            if suite is not None:
                metrics.update({f"cap.{k}": v for k, v in suite.score().items()})
        return metrics

    @torch.no_grad()
    def rescore(self, cfg: dict, snapshot: dict[str, np.ndarray], n_done: int,
                first_k: int | None, capability: dict | None) -> dict:
        """For `pipelines.reeval`: `reeval.first<k>.<metric>` (CounterFact metrics of the
        stream's first `first_k` edits, or of all `n_done` applied when fewer; None skips)
        and `cap.<task>.<metric>` (the suite `capability` selects; None skips) of a
        snapshot taken after `n_done` edits. `{}` is the base model (pass n_done=first_k)."""
        config, requests = self._stream_inputs(cfg)
        suite = self._suite(capability)
        metrics = {}
        with self._weights(snapshot):
            if first_k:
                tic = time.perf_counter()
                k = min(first_k, n_done, len(requests))
                scores = score_requests(self.lm, requests[:k], config.eval_batch_size)
                metrics.update({f"reeval.first{first_k}.{name}": value
                                for name, value in aggregate(scores).items()})
                metrics["timing.retention_seconds"] = time.perf_counter() - tic
            if suite is not None:
                tic = time.perf_counter()
                metrics.update({f"cap.{k}": v for k, v in suite.score().items()})
                metrics["timing.capability_seconds"] = time.perf_counter() - tic
        return metrics
