"""Ray actors of the grid: one editor actor per cell, evaluator actors per model.

`EditorActor.run` is a streaming generator: it applies the cell's stream in order and, at
every evaluation point, publishes a snapshot of the edited layers (numpy, in the object
store), hands it to an evaluator without waiting for the result, checkpoints, and yields
an event with both references. Editing never waits for evaluation.

`Evaluator` loads its base model once; for each snapshot it writes the snapshot's layers
into that model, scores the CounterFact metrics on the edits so far and the retention of
the first ones, plus perplexity on held-out text, and puts the base weights back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch

from tasks.anchor import AnchorStats, read_corpus
from tasks.config import from_dict
from tasks.data import load_requests
from tasks.metrics import perplexity
from tasks.models import load_model
from tasks.stream import EditStream, StreamConfig, evaluation, stream_fluency, unedited_scores


@dataclass
class HeldoutArgs:
    """Held-out text for perplexity: texts of `corpus` after those the anchors read."""

    corpus: str = "../shared/data/agnews/test.tsv"
    offset: int = 7000
    n_texts: int = 100
    max_tokens: int = 128


def _use_threads() -> None:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(round(cpus))))


def _device() -> str:
    return "cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"


def to_numpy(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: w.detach().cpu().numpy() for name, w in weights.items()}


class EditorActor:
    """Holds one cell's model and editor (`EditStream`) for the whole stream."""

    def __init__(self, cfg: dict, anchor: dict[int, tuple[np.ndarray, int]],
                 baseline: dict, evaluator, heldout: dict):
        _use_threads()
        config = from_dict(StreamConfig, {**cfg, "device": _device()})
        stats = {int(l): AnchorStats(torch.from_numpy(np.array(cov)), count)
                 for l, (cov, count) in anchor.items()}
        self.cfg, self.heldout = cfg, heldout
        self.stream = EditStream(config, anchor=stats, baseline=baseline)
        self.evaluator = evaluator

    def run(self):
        """Yields {"edits", "snapshot", "metrics"} at each evaluation point (refs), then
        {"done": True, "summary", "edited"} with the final edited layers."""
        stream = self.stream
        stream.checkpoint()
        while not stream.done:
            if stream.step():
                snapshot = ray.put(to_numpy(stream.edited_layers()))
                metrics = self.evaluator.evaluate.remote(self.cfg, snapshot, stream.position,
                                                         self.heldout)
                stream.record({})   # speed and step stats; quality metrics come from `metrics`
                stream.checkpoint()
                yield {"edits": stream.position, "snapshot": snapshot, "metrics": metrics,
                       "speed": stream.state["history"][-1]}
        final = {}
        if stream.cfg.fluency_samples:
            final["fluency"] = stream_fluency(stream.lm, stream.requests, stream.cfg)
        yield {"done": True, "summary": stream.summary(final),
               "edited": to_numpy(stream.edited_layers())}


class Evaluator:
    """A base model that scores snapshots of edited layers."""

    def __init__(self, model: str):
        _use_threads()
        self.lm = load_model(model, device=_device())
        self._requests: dict[str, list] = {}
        self._heldout: dict[str, list[str]] = {}

    def _stream_inputs(self, cfg: dict):
        config = from_dict(StreamConfig, cfg)
        key = f"{config.data}:{config.offset}:{config.num_edits}"
        if key not in self._requests:
            self._requests[key] = load_requests(config.data, limit=config.num_edits,
                                                offset=config.offset)
        return config, self._requests[key]

    def _perplexity(self, heldout: dict) -> float:
        args = HeldoutArgs(**heldout)
        key = f"{args.corpus}:{args.offset}:{args.n_texts}"
        if key not in self._heldout:
            self._heldout[key] = read_corpus(args.corpus, args.n_texts, offset=args.offset)
        return perplexity(self.lm, self._heldout[key], args.max_tokens)

    def baseline(self, cfg: dict, heldout: dict) -> dict:
        """The unedited model's scores on a cell's requests (disk-cached), and perplexity."""
        config, requests = self._stream_inputs(cfg)
        scores = dict(unedited_scores(self.lm, requests, config))
        scores["perplexity"] = self._perplexity(heldout)
        return scores

    @torch.no_grad()
    def evaluate(self, cfg: dict, snapshot: dict[str, np.ndarray], n_done: int,
                 heldout: dict) -> dict:
        config, requests = self._stream_inputs(cfg)
        params = dict(self.lm.model.named_parameters())
        original = {name: params[name].detach().clone() for name in snapshot}
        try:
            for name, weight in snapshot.items():
                params[name].copy_(torch.from_numpy(np.array(weight)))
            metrics = evaluation(self.lm, requests, config, n_done,
                                 final=n_done == config.num_edits)
            metrics["perplexity"] = self._perplexity(heldout)
        finally:
            for name, weight in original.items():
                params[name].copy_(weight)
        return metrics
