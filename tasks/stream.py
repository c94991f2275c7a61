"""An edit stream: one model, one editor, N CounterFact edits applied in order.

`EditStream` holds the loaded model, the editor and the stream's position; it applies one
batch per `step()`, evaluates on request, checkpoints and resumes. It knows nothing of
MLflow or Ray: the single-process CLI (`pipelines/edit_stream.py`) and the Ray editor
actor (`tasks/remote/actors.py`) both drive it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tasks.anchor import AnchorArgs, cached_anchor_stats
from tasks.config import ConfigError, flatten, from_dict, to_dict
from tasks.data import MAX_CHARS, SkippedRecord, load_requests
from tasks.edit_step import apply_edit_batch
from tasks.editors import build_editor, resolve_editor
from tasks.errors import UserError, brief
from tasks.evaluate.metrics import aggregate, fluency, score_requests
from tasks.evaluate.neighbours import NeighbourArgs, with_neighbours
from tasks.extract.keys import KeyArgs
from tasks.extract.prompts import check_request_tokens, make_context_templates
from tasks.extract.values import ValueArgs, written_directions
from tasks.files import write_atomically
from tasks.models import cache_root, load_model, resolve_device
from tasks.storage import Location

log = logging.getLogger("rlsedit.stream")
DEFAULT_DATA = "../shared/data/counterfact/counterfact-edit.json"


@dataclass
class StreamConfig:
    model: str = "smollm2-135m"
    editor: str = "rlsedit"         # a name from tasks/editors/editors.yaml
    editor_args: dict = field(default_factory=dict)  # overrides of that editor's settings
    data: str = DEFAULT_DATA
    offset: int = 0                 # first record of `data` to edit
    num_edits: int = 100
    batch_size: int = 10            # edits per update step
    layers: list[int] | None = None  # None: the model's default edit layers
    eval_every: int = 50            # edits between evaluations (each also checkpoints)
    checkpoint_every: int | None = None  # checkpoint every this many edits, and/or
    checkpoint_minutes: float = 5.0      # every this many minutes: what a crash may cost
    eval_max: int = 200             # intermediate evaluations score at most this many edits
    retention_fraction: float = 0.1  # retention = metrics of the first 10% after all edits
    retention_edits: int | None = None  # or of exactly this many first edits
    retention_also: list[int] = field(default_factory=list)  # more first-k windows, scored
    # at every point too and logged as retention<k>_<metric> (a 10K stream: [1000])
    recent_edits: int | None = None  # the last k edits applied, scored at every point as
    # recent_<metric>: are new edits still written as well as the first ones are kept?
    fluency_samples: int = 50       # edit prompts generated from for fluency (0: skip)
    fluency_tokens: int = 50
    eval_batch_size: int = 32
    seed: int = 0
    skip_bad_records: bool = False  # bad records: False stops the run, True skips and logs them
    max_text_chars: int = MAX_CHARS  # a longer prompt or answer is a bad record (tasks/data.py)
    device: str = "auto"            # auto | cpu | cuda
    output_dir: str | None = None   # checkpoint + artifacts; default runs/<run name>; a
    # local path or a URI pyarrow.fs reads (s3://bucket/run, gs://...): tasks/storage.py
    output_json: str | None = None
    experiment: str = "rlsedit-stream"
    run_name: str | None = None
    # streams stop each edit's value optimisation at a 2-nat margin over the true answer:
    # on 300 edits of the tuning split it kept perplexity within 10% and specificity
    # unchanged with 3× fewer Adam steps than the NLL stop; its replays run in bfloat16
    # where the hardware has it, 1.8× faster at the same edits (docs/benchmarks.md). A
    # `values:` mapping changes only the keys it names.
    values: ValueArgs = field(
        default_factory=lambda: ValueArgs(stop_on="margin", autocast="auto"))
    keys: KeyArgs = field(default_factory=KeyArgs)
    anchor: AnchorArgs = field(default_factory=AnchorArgs)
    neighbours: NeighbourArgs = field(default_factory=NeighbourArgs)
    # what the evaluator scores besides the edits (`tasks.remote.actors.Evaluator`): held-out
    # perplexity (HeldoutArgs keys) and the lm-eval suite (CapabilityArgs keys; none unless
    # a profile or tasks are named)
    heldout: dict = field(default_factory=dict)
    capability: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("num_edits", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be positive, got {self.checkpoint_minutes}")
        if self.recent_edits is not None and self.recent_edits < 1:
            raise ValueError(f"recent_edits must be a positive number of edits or null, got "
                             f"{self.recent_edits}")
        if not 0 < self.retention_fraction <= 1:
            raise ValueError(f"retention_fraction must be in (0, 1], got {self.retention_fraction}")

    @property
    def retention_k(self) -> int:
        if self.retention_edits is not None:
            return max(1, min(int(self.retention_edits), self.num_edits))
        return max(1, int(round(self.retention_fraction * self.num_edits)))

    @property
    def name(self) -> str:
        return self.run_name or (f"{self.model.replace('/', '_')}-{self.editor}-n{self.num_edits}"
                                 f"-b{self.batch_size}-s{self.seed}")

    @property
    def out_dir(self) -> Location:
        return Location(self.output_dir or Path("runs") / self.name).resolve()


def snapshot_path(out_dir: Location, n: int) -> Location:
    """A stream's snapshot of its edited layers after `n` edits (safetensors)."""
    return Location(out_dir) / "snapshots" / f"edits-{n}.safetensors"


# A stream's checkpoint, and the one before it, kept so that a damaged latest checkpoint
# (a bad disk, a broken copy) costs one checkpoint interval, not the run
CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint.prev.pt"


def read_checkpoint(path: Location) -> dict:
    """The state a stream checkpointed to `path` (on disk or in object storage)."""
    with path.local_copy() as local:
        return torch.load(local, weights_only=False)


def newest_checkpoint(out_dir: Location) -> dict | None:
    """The newest readable checkpoint in `out_dir`: CHECKPOINT, else PREVIOUS_CHECKPOINT
    (with a warning when CHECKPOINT is there but unreadable); None when neither is there.
    A UserError names what cannot be read when nothing can."""
    failures = []
    for path in (out_dir / CHECKPOINT, out_dir / PREVIOUS_CHECKPOINT):
        if not path.exists():
            continue
        try:
            saved = read_checkpoint(path)
        except Exception as err:   # torch's zip or pickle errors on a damaged file
            failures.append(f"{path} ({brief(err, 200)})")
            continue
        if failures:
            log.warning("the checkpoint %s cannot be read; resuming from the previous one, "
                        "%s", failures[0], path)
        return saved
    if failures:
        previous = f", nor can the previous one, {failures[1]}" if len(failures) > 1 else ""
        raise UserError(f"the checkpoint {failures[0]} cannot be read{previous}: restore it "
                        f"from a backup, or remove {CHECKPOINT} and {PREVIOUS_CHECKPOINT} "
                        f"from {out_dir} to start the stream over")
    return None


UNCONVERGED_NLL = 0.5   # a target value whose NLL stays above this did not write its edit


def unconverged_fraction(records: list[dict], nll: torch.Tensor) -> float:
    """The share of edits whose value optimisation ran out of steps before its stop rule
    fired (older records, without `value_converged`: whose NLL stayed above
    UNCONVERGED_NLL)."""
    if all("value_converged" in r for r in records):
        return sum(not r["value_converged"] for r in records) / len(records)
    return float((nll > UNCONVERGED_NLL).float().mean())


def convergence(records: list[dict]) -> dict[str, float]:
    """Over every edit so far: the target values' final NLL and ‖δ‖/‖z‖ (mean, max), the
    share of edits whose value optimisation did not converge and the mean number of Adam
    steps an edit took."""
    if not records:
        return {}
    nll = torch.tensor([r["value_nll"] for r in records])
    ratio = torch.tensor([r["delta_ratio"] for r in records])
    return {"all_value_nll_mean": float(nll.mean()), "all_value_nll_max": float(nll.max()),
            "all_delta_ratio_mean": float(ratio.mean()),
            "all_delta_ratio_max": float(ratio.max()),
            "unconverged_fraction": unconverged_fraction(records, nll),
            **({"all_value_steps_mean": sum(r["value_steps"] for r in records) / len(records)}
               if all("value_steps" in r for r in records) else {})}


PAIRED_METRICS = ("efficacy", "generalization", "specificity", "specificity_nbhd")

# Settings that change what is logged, not the edits: a run may resume with other values.
NOT_IN_DIGEST = ("output_dir", "output_json", "run_name", "experiment", "device", "eval_every",
                 "checkpoint_every", "checkpoint_minutes", "eval_max", "eval_batch_size",
                 "fluency_samples", "fluency_tokens", "neighbours", "max_text_chars",
                 "heldout", "capability", "retention_also", "recent_edits")


def edit_settings(cfg: StreamConfig) -> dict:
    """Everything in `cfg` that shapes the edits, as a nested dict."""
    keep = to_dict(cfg)
    for key in NOT_IN_DIGEST:
        keep.pop(key)
    keep["editor_args"] = resolve_editor(cfg.editor, cfg.editor_args)[2]  # registry edits count
    return keep


def config_digest(cfg: StreamConfig) -> str:
    """What must match for a checkpoint to be resumed: everything that shapes the edits."""
    return hashlib.sha1(json.dumps(edit_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(saved: dict, cfg: StreamConfig) -> list[str]:
    """The settings that shape the edits (dotted keys) in which `cfg` differs from `saved`,
    a stream config as `to_dict` wrote it. A setting added to the code since `saved` was
    written takes its default there, so a run resumes after an upgrade that only adds
    settings, as long as it leaves them at their defaults (a default that changed still
    differs: `saved` holds the old value)."""
    try:
        before = flatten(edit_settings(from_dict(StreamConfig, saved)))
    except ConfigError as err:   # a setting the code no longer has
        return [f"(the saved config no longer reads: {err})"]
    now = flatten(edit_settings(cfg))
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def named(changes: list[str], most: int = 4) -> str:
    """`config_changes` for a one-line message."""
    return ", ".join(changes[:most]) + (" …" if len(changes) > most else "") + " differ"


def stream_requests(cfg: StreamConfig, tokenizer) -> tuple[list, list[SkippedRecord]]:
    """The stream's edit requests, each checked against the model's tokenizer before any
    edit, and (with `skip_bad_records`) the records left out. The editor and the
    evaluators call this alike, so both see the same requests."""
    skipped = [] if cfg.skip_bad_records else None
    requests = load_requests(cfg.data, limit=cfg.num_edits, offset=cfg.offset,
                             check=lambda request: check_request_tokens(tokenizer, request),
                             skipped=skipped, max_chars=cfg.max_text_chars)
    for record in skipped or []:
        log.warning("skipped %s", record.reason)
    return with_neighbours(requests, cfg.neighbours, cfg.seed), skipped or []


def evaluation(lm, requests, cfg: StreamConfig, n_done: int, final: bool) -> dict[str, float]:
    """Metrics on the edits applied so far (all when final, else at most eval_max, evenly
    spaced) and retention: the same metrics on the first `retention_k` edits of the stream
    (and on each `retention_also` window, and on the last `recent_edits` applied). Each
    request is scored once even when it counts for several."""
    return scored_evaluation(lm, requests, cfg, n_done, final)[0]


def scored_evaluation(lm, requests, cfg: StreamConfig, n_done: int,
                      final: bool) -> tuple[dict[str, float], dict[str, list]]:
    """`evaluation`'s metrics and the per-request scores behind them: {"edits": indices
    scored, metric: [score per index], "retention_<metric>": [per early edit]} for the
    PAIRED_METRICS, so two runs over the same edits can be compared edit by edit."""
    picked = list(range(n_done))
    if not final and n_done > cfg.eval_max:
        picked = [int(i * n_done / cfg.eval_max) for i in range(cfg.eval_max)]
    early = list(range(min(cfg.retention_k, n_done)))
    windows = {f"retention{k}_": list(range(min(k, n_done))) for k in cfg.retention_also}
    if cfg.recent_edits:
        windows["recent_"] = list(range(max(0, n_done - cfg.recent_edits), n_done))
    union = sorted(set(picked).union(early, *windows.values()))
    scores = dict(zip(union, score_requests(lm, [requests[i] for i in union],
                                            cfg.eval_batch_size)))
    metrics = aggregate([scores[i] for i in picked])
    metrics.update(aggregate([scores[i] for i in early], "retention_"))
    for prefix, window in windows.items():
        metrics.update(aggregate([scores[i] for i in window], prefix))
    per_request = {"edits": picked}
    for name in PAIRED_METRICS:
        per_request[name] = [scores[i][name] for i in picked]
        per_request["retention_" + name] = [scores[i][name] for i in early]
    return metrics, per_request


def unedited_scores(lm, requests, cfg: StreamConfig) -> dict[str, float]:
    """The unedited model's metrics on the stream's requests (and fluency), computed once
    per model, data slice and evaluation settings, and cached on disk."""
    key = json.dumps([cfg.model, str(Path(cfg.data).resolve()) if Path(cfg.data).exists()
                      else cfg.data, cfg.offset, cfg.num_edits, cfg.retention_k,
                      cfg.fluency_samples, cfg.fluency_tokens]
                     + ([True] if cfg.skip_bad_records else [])    # old keys stay valid
                     + ([to_dict(cfg.neighbours)] if cfg.neighbours.pool else [])
                     + ([cfg.retention_also] if cfg.retention_also else []))
    path = cache_root() / "unedited" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return json.loads(path.read_text())["scores"]
    log.info("scoring the unedited model on the %d edit requests", len(requests))
    # no recent_ window: the newest edits differ at every point, so the unedited model has
    # no one score for them
    scores = evaluation(lm, requests, replace(cfg, recent_edits=None), len(requests), final=True)
    if cfg.fluency_samples:
        scores["fluency"] = fluency(lm, [r.prompt for r in requests[:cfg.fluency_samples]],
                                    cfg.fluency_tokens)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps({"key": key, "scores": scores})))
    return scores


def stream_fluency(lm, requests, cfg: StreamConfig) -> float:
    return fluency(lm, [r.prompt for r in requests[:cfg.fluency_samples]], cfg.fluency_tokens)


class EditStream:
    """The model, the editor and where the stream stands; resumes from the newest readable
    checkpoint in the config's output folder (`newest_checkpoint`; on disk or in object
    storage) when one written by the same config is there."""

    def __init__(self, cfg: StreamConfig, anchor: dict | None = None,
                 baseline: dict | None = None):
        """`anchor` {layer: AnchorStats} and `baseline` (the unedited scores) may be given
        when computed elsewhere; else they come from (or go to) the disk cache."""
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.editor_settings = resolve_editor(cfg.editor, cfg.editor_args)[2]  # typos fail early
        self.lm = load_model(cfg.model, device=resolve_device(cfg.device))
        self.requests, self.skipped = stream_requests(cfg, self.lm.tokenizer)
        self.layers = self.lm.check_layers(cfg.layers if cfg.layers is not None
                                           else self.lm.spec.edit_layers)
        if anchor is None:
            anchor = cached_anchor_stats(self.lm, list(self.layers), cfg.anchor)
        self.anchor = anchor
        self.W0 = {l: self.lm.edit_weight(l) for l in self.layers}   # before any restore
        self.editor = build_editor(cfg.editor, self.W0, anchor, self._editor_overrides())
        cfg.out_dir.mkdir()
        self.ckpt_path = cfg.out_dir / CHECKPOINT
        self.state = {"position": 0, "history": [], "edit_seconds": 0.0, "run_id": None,
                      "config": to_dict(cfg), "baseline": None, "templates": None}
        saved = newest_checkpoint(cfg.out_dir)
        if saved is not None:
            self._restore(saved)
        if self.state["baseline"] is None and baseline is not None:
            self.state["baseline"] = baseline
        if self.state["templates"] is None:
            self.state["templates"] = make_context_templates(
                self.lm, cfg.values.n_prefixes, cfg.values.prefix_tokens, cfg.seed,
                cfg.values.open_prefixes)
        self.last_step_stats: dict[str, float] = {}
        self._last_checkpoint = time.monotonic()

    def _editor_overrides(self) -> dict:
        """The config's editor_args, plus the batches planned when a deviation budget asks."""
        if self.editor_settings.get("deviation_budget") is None:
            return self.cfg.editor_args
        batches = -(-self.cfg.num_edits // self.cfg.batch_size)
        return {**self.cfg.editor_args, "planned_batches": batches}

    def _restore(self, saved: dict) -> None:
        if "config" in saved:
            changed = config_changes(saved["config"], self.cfg)
        else:   # written before checkpoints kept their config: only its digest
            changed = [] if saved["digest"] == config_digest(self.cfg) else ["its settings"]
        if changed:
            raise UserError(f"{self.ckpt_path} was written by a different config "
                            f"({named(changed)}); remove it or choose another output_dir")
        self.state = {k: v for k, v in saved.items() if k not in ("editor", "digest")}
        self.state["config"] = to_dict(self.cfg)
        self.editor.load_state_dict(saved["editor"])
        for layer in self.layers:
            self.lm.write_edit_weight(layer, self.editor.weight(layer))
        log.info("resuming %s at edit %d", self.cfg.name, self.position)

    @property
    def position(self) -> int:
        return self.state["position"]

    @property
    def done(self) -> bool:
        return self.position >= self.cfg.num_edits

    def baseline(self) -> dict[str, float]:
        """The unedited model's scores (from the disk cache after the first time)."""
        if self.state["baseline"] is None:
            if self.position:
                raise RuntimeError("the unedited scores must be taken before any edit")
            self.state["baseline"] = unedited_scores(self.lm, self.requests, self.cfg)
        return self.state["baseline"]

    def step(self) -> bool:
        """Apply the next batch; True when the stream has reached an evaluation point (the
        caller evaluates and checkpoints). Between evaluation points it checkpoints itself
        every `checkpoint_every` edits (when set) and every `checkpoint_minutes`."""
        start = self.position
        batch = self.requests[start:start + self.cfg.batch_size]
        tic = time.perf_counter()
        self.last_step_stats = apply_edit_batch(self.lm, self.editor, batch,
                                                self.state["templates"], self.layers,
                                                self.cfg.values, self.cfg.keys,
                                                self.avoided_directions())
        self.state["edit_seconds"] += time.perf_counter() - tic
        self.state.setdefault("edit_records", []).extend(self.last_step_stats.pop("edits", []))
        phases = self.state.setdefault("phase_seconds", {})
        for key, sec in self.last_step_stats.items():
            if key.startswith("seconds_"):
                phases[key[8:]] = phases.get(key[8:], 0.0) + sec
        if "rewritten" in self.last_step_stats:   # values.rewrite_below: edits written twice
            self.state["rewritten_total"] = (self.state.get("rewritten_total", 0)
                                             + self.last_step_stats["rewritten"])
        self.state["position"] = n = start + len(batch)
        every = self.cfg.eval_every
        at_eval_point = n // every > start // every or n == self.cfg.num_edits
        if not at_eval_point and self._checkpoint_due(start, n):
            self.checkpoint()
        return at_eval_point

    def avoided_directions(self) -> dict[int, torch.Tensor] | None:
        """`values.avoid_written`: {layer: [r, d_v]} the top output directions of the change
        written so far at the value layer (the last edited one), and with `avoid_on: writes`
        at every edited layer; None when off or for FT, {} before any change."""
        values = self.cfg.values
        if values.avoid_written == 0 or self.editor.needs != "keys_values":
            return None
        layers = self.layers if values.avoid_on == "writes" else self.layers[-1:]
        found = {layer: written_directions(self.editor.weight(layer).double() - self.W0[layer],
                                           values.avoid_written) for layer in layers}
        return {layer: top for layer, top in found.items() if top is not None}

    def _checkpoint_due(self, start: int, n: int) -> bool:
        edits = self.cfg.checkpoint_every
        if edits and n // edits > start // edits:
            return True
        return time.monotonic() - self._last_checkpoint >= 60 * self.cfg.checkpoint_minutes

    def evaluate(self) -> dict[str, float]:
        """Metrics now (see `evaluation`), speed and the last step's stats."""
        n = self.position
        tic = time.perf_counter()
        metrics, per_request = scored_evaluation(self.lm, self.requests, self.cfg, n,
                                                 final=n == self.cfg.num_edits)
        if n == self.cfg.num_edits:
            self.state["final_scores"] = per_request
        phases = self.state.setdefault("phase_seconds", {})
        phases["evaluate"] = phases.get("evaluate", 0.0) + time.perf_counter() - tic
        return self.record(metrics)

    def record(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add speed and the last step's stats to `metrics` and keep them in the history."""
        metrics = {**metrics, "edits_per_second": self.position / self.state["edit_seconds"],
                   **self.last_step_stats, **convergence(self.state.get("edit_records", [])),
                   **{k: self.state[k] for k in ("rewritten_total",) if k in self.state},
                   **self.anchor_deviation(),
                   **getattr(self.editor, "logged_settings", dict)()}
        self.state["history"].append({"edits": self.position, **metrics})
        return metrics

    def anchor_deviation(self) -> dict[str, float]:
        """`anchor_deviation.L<layer>` (see `AnchorStats.deviation`) per edited layer and
        `anchor_deviation` (their mean), of the weights in the model now."""
        per_layer = {f"anchor_deviation.L{l}": self.anchor[l].deviation(self.lm.edit_weight(l),
                                                                        self.W0[l])
                     for l in self.layers}
        return {"anchor_deviation": sum(per_layer.values()) / len(per_layer), **per_layer}

    def checkpoint(self) -> None:
        """Write the state to CHECKPOINT (atomically), the one before becoming
        PREVIOUS_CHECKPOINT."""
        self.ckpt_path.write_with(lambda tmp: torch.save(
            {**self.state, "editor": self.editor.state_dict()}, tmp),
            keep=self.cfg.out_dir / PREVIOUS_CHECKPOINT)
        self._last_checkpoint = time.monotonic()

    def edited_layers(self) -> dict[str, torch.Tensor]:
        """The edited projections' weights by parameter name (CPU, contiguous)."""
        return self.lm.edited_layers(self.layers)

    def save_layers(self, path: Location) -> Location:
        """Write the edited layers now to `path` (safetensors, atomically)."""
        from safetensors.torch import save_file

        path.write_with(lambda tmp: save_file(self.edited_layers(), str(tmp)))
        return path

    def save_snapshot(self) -> Location:
        """Write the edited layers now to `snapshot_path`. Done at every evaluation point
        before the checkpoint, so a checkpointed evaluation point always has its snapshot
        stored for whoever scores it after a crash."""
        return self.save_layers(snapshot_path(self.cfg.out_dir, self.position))

    def summary(self, final_metrics: dict[str, float]) -> dict:
        cfg = self.cfg
        return {
            "final": final_metrics,
            "unedited": self.state["baseline"],
            "retention_first_k": cfg.retention_k,
            "edits_per_second": cfg.num_edits / self.state["edit_seconds"],
            "seconds_per_edit": self.state["edit_seconds"] / cfg.num_edits,
            "phase_seconds": self.state.get("phase_seconds", {}),  # values, keys, update, evaluate
            "edit_layers": list(self.layers),
            "skipped_records": [asdict(record) for record in self.skipped],
            "edit_records": self.state.get("edit_records", []),  # per edit: value NLL, ‖δ‖/‖z‖
            "final_scores": self.state.get("final_scores"),      # per request, at the end
            "history": self.state["history"],
            "config": to_dict(cfg),
            "editor_settings": self.editor_settings,
            "mlflow_run_id": self.state["run_id"],
        }
