"""One edit stream, single process: a model, an editor, N CounterFact edits in order.

    python -m pipelines.edit_stream --model smollm2-135m --editor rlsedit \\
        --data ../shared/data/counterfact/counterfact-edit.json --num-edits 100 \\
        --batch-size 10 --eval-every 50 --output-json runs/summary.json
    python -m pipelines.edit_stream --config pipelines/configs/stream-demo.yaml --set editor_args.mu=0.1

Evaluates every `eval_every` edits (edits so far, at most `eval_max` of them, and the
first `retention_fraction` of the stream), logs to MLflow with step = edits applied,
checkpoints at each evaluation (re-running the same command resumes), and writes a JSON
summary: final metrics, retention, the unedited model's scores on the same prompts,
fluency, edits per second and the config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasks.config import from_dict, load_yaml, set_override, to_dict
from tasks.anchor import AnchorArgs, cached_anchor_stats
from tasks.data import load_requests
from tasks.edit_step import apply_edit_batch, layer_weight, write_weight
from tasks.editors import build_editor, resolve_editor
from tasks.extract.prompts import make_context_templates
from tasks.extract.values import ValueArgs
from tasks.files import write_atomically
from tasks.metrics import aggregate, fluency, score_requests
from tasks.models import cache_root, load_model

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
    eval_every: int = 50            # edits between evaluations (and checkpoints)
    eval_max: int = 200             # intermediate evaluations score at most this many edits
    retention_fraction: float = 0.1  # retention = metrics of the first 10% after all edits
    retention_edits: int | None = None  # or of exactly this many first edits
    fluency_samples: int = 50       # edit prompts generated from for fluency (0: skip)
    fluency_tokens: int = 50
    eval_batch_size: int = 32
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    output_dir: str | None = None   # checkpoint + artifacts; default runs/<run name>
    output_json: str | None = None
    experiment: str = "rlsedit-stream"
    run_name: str | None = None
    values: ValueArgs = field(default_factory=ValueArgs)
    anchor: AnchorArgs = field(default_factory=AnchorArgs)

    def __post_init__(self):
        for name in ("num_edits", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
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


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# Settings that change what is logged, not the edits: a run may resume with other values.
NOT_IN_DIGEST = ("output_dir", "output_json", "run_name", "experiment", "device", "eval_every",
                 "eval_max", "eval_batch_size", "fluency_samples", "fluency_tokens")


def config_digest(cfg: StreamConfig) -> str:
    """What must match for a checkpoint to be resumed: everything that shapes the edits."""
    keep = to_dict(cfg)
    for key in NOT_IN_DIGEST:
        keep.pop(key)
    keep["editor_args"] = resolve_editor(cfg.editor, cfg.editor_args)[2]  # registry edits count
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def evaluation(lm, requests, cfg: StreamConfig, n_done: int, final: bool) -> dict[str, float]:
    """Metrics on the edits applied so far (all when final, else at most eval_max, evenly
    spaced) and retention: the same metrics on the first `retention_k` edits of the stream.
    Each request is scored once even when it counts for both."""
    picked = list(range(n_done))
    if not final and n_done > cfg.eval_max:
        picked = [int(i * n_done / cfg.eval_max) for i in range(cfg.eval_max)]
    early = list(range(min(cfg.retention_k, n_done)))
    union = sorted(set(picked) | set(early))
    scores = dict(zip(union, score_requests(lm, [requests[i] for i in union],
                                            cfg.eval_batch_size)))
    metrics = aggregate([scores[i] for i in picked])
    metrics.update(aggregate([scores[i] for i in early], "retention_"))
    return metrics


def unedited_scores(lm, requests, cfg: StreamConfig) -> dict[str, float]:
    """The unedited model's metrics on the stream's requests (and fluency), computed once
    per model, data slice and evaluation settings, and cached on disk."""
    key = json.dumps([cfg.model, str(Path(cfg.data).resolve()) if Path(cfg.data).exists()
                      else cfg.data, cfg.offset, cfg.num_edits, cfg.retention_k,
                      cfg.fluency_samples, cfg.fluency_tokens])
    path = cache_root() / "unedited" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return json.loads(path.read_text())["scores"]
    log.info("scoring the unedited model on the %d edit requests", len(requests))
    scores = evaluation(lm, requests, cfg, len(requests), final=True)
    if cfg.fluency_samples:
        scores["fluency"] = fluency(lm, [r.prompt for r in requests[:cfg.fluency_samples]],
                                    cfg.fluency_tokens)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps({"key": key, "scores": scores})))
    return scores


def _save(obj, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def run_stream(cfg: StreamConfig) -> dict:
    import mlflow

    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir or Path("runs") / cfg.name).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    digest = config_digest(cfg)

    editor_settings = resolve_editor(cfg.editor, cfg.editor_args)[2]  # fails early on a typo
    requests = load_requests(cfg.data, limit=cfg.num_edits, offset=cfg.offset)
    lm = load_model(cfg.model, device=pick_device(cfg.device))
    layers = lm.check_layers(cfg.layers if cfg.layers is not None else lm.spec.edit_layers)
    anchor = cached_anchor_stats(lm, list(layers), cfg.anchor)
    editor = build_editor(cfg.editor, {l: layer_weight(lm, l) for l in layers},
                          anchor, cfg.editor_args)

    state = {"position": 0, "history": [], "edit_seconds": 0.0, "run_id": None,
             "digest": digest, "baseline": None, "templates": None}
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        if saved["digest"] != digest:
            raise RuntimeError(f"{ckpt_path} was written by a different config; "
                               f"remove it or choose another output_dir")
        state = saved
        editor.load_state_dict(saved["editor"])
        for layer in layers:
            write_weight(lm, layer, editor.weight(layer))
        log.info("resuming %s at edit %d", cfg.name, state["position"])

    if state["templates"] is None:
        state["templates"] = make_context_templates(lm, cfg.values.n_prefixes,
                                                    cfg.values.prefix_tokens, cfg.seed)
    if state["baseline"] is None:
        state["baseline"] = unedited_scores(lm, requests, cfg)
        _save({**state, "editor": editor.state_dict()}, ckpt_path)

    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_id=state["run_id"], run_name=cfg.name) as run:
        if state["run_id"] is None:
            state["run_id"] = run.info.run_id
            mlflow.log_params(_flatten(to_dict(cfg)))
            mlflow.log_params(_flatten(editor_settings, "editor."))
            mlflow.log_param("edit_layers", list(layers))
            mlflow.log_dict({**to_dict(cfg), "editor_settings": editor_settings}, "config.json")
            mlflow.log_dict({"templates": state["templates"]}, "context_templates.json")
            mlflow.log_metrics({f"unedited_{k}": v for k, v in state["baseline"].items()}, step=0)
        progress = tqdm(total=cfg.num_edits, initial=state["position"], desc=f"{cfg.editor} edits",
                        unit="edit")
        while state["position"] < cfg.num_edits:
            start = state["position"]
            batch = requests[start:start + cfg.batch_size]
            tic = time.perf_counter()
            step_stats = apply_edit_batch(lm, editor, batch, state["templates"], layers,
                                          cfg.values)
            state["edit_seconds"] += time.perf_counter() - tic
            state["position"] = start + len(batch)
            progress.update(len(batch))
            n = state["position"]
            crossed = n // cfg.eval_every > start // cfg.eval_every
            if crossed or n == cfg.num_edits:
                metrics = evaluation(lm, requests, cfg, n, final=n == cfg.num_edits)
                metrics["edits_per_second"] = n / state["edit_seconds"]
                metrics.update(step_stats)
                state["history"].append({"edits": n, **metrics})
                mlflow.log_metrics(metrics, step=n)
                progress.set_postfix(eff=f"{metrics['efficacy']:.2f}",
                                     ret=f"{metrics['retention_efficacy']:.2f}")
                _save({**state, "editor": editor.state_dict()}, ckpt_path)
        progress.close()

        final = dict(state["history"][-1])
        if cfg.fluency_samples:
            final["fluency"] = fluency(lm, [r.prompt for r in requests[:cfg.fluency_samples]],
                                       cfg.fluency_tokens)
            mlflow.log_metric("fluency", final["fluency"], step=cfg.num_edits)
        summary = {
            "final": final,
            "unedited": state["baseline"],
            "retention_first_k": cfg.retention_k,
            "edits_per_second": cfg.num_edits / state["edit_seconds"],
            "seconds_per_edit": state["edit_seconds"] / cfg.num_edits,
            "edit_layers": list(layers),
            "history": state["history"],
            "config": to_dict(cfg),
            "editor_settings": editor_settings,
            "mlflow_run_id": state["run_id"],
        }
        from safetensors.torch import save_file
        weights_path = out_dir / "edited_layers.safetensors"
        save_file({lm.spec.mlp_out_name(l) + ".weight": lm.mlp_out(l).weight.detach().cpu()
                   .contiguous() for l in layers}, str(weights_path))
        mlflow.log_artifact(str(weights_path))
        mlflow.log_dict(summary, "summary.json")
    if cfg.output_json:
        Path(cfg.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output_json).write_text(json.dumps(summary, indent=2))
    return summary


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


CLI_FLAGS = {  # flag -> config key
    "model": "model", "editor": "editor", "data": "data", "num_edits": "num_edits",
    "batch_size": "batch_size", "eval_every": "eval_every", "output_json": "output_json",
    "output_dir": "output_dir", "seed": "seed", "device": "device", "offset": "offset",
}


def parse_args(argv=None) -> StreamConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file with StreamConfig keys")
    for flag in CLI_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag)
    parser.add_argument("--layers", help="comma-separated edit layers, e.g. 6 or 4,5,6")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. editor_args.mu=0.1 (repeatable)")
    args = parser.parse_args(argv)
    data = load_yaml(args.config) if args.config else {}
    for flag, key in CLI_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            set_override(data, f"{key}={value}")
    if args.layers:
        data["layers"] = [int(x) for x in args.layers.split(",")]
    for assignment in args.set:
        set_override(data, assignment)
    return from_dict(StreamConfig, data)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = parse_args(argv)
    summary = run_stream(cfg)
    final, base = summary["final"], summary["unedited"]
    print(f"\n{'metric':28s} {'unedited':>9s} {'edited':>9s}")
    for key in final:
        if key in base and isinstance(final[key], float) and not math.isnan(final[key]):
            print(f"{key:28s} {base[key]:9.3f} {final[key]:9.3f}")
    print(f"seconds per edit: {summary['seconds_per_edit']:.2f}")


if __name__ == "__main__":
    main()
