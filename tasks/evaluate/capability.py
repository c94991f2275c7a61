"""Capability suite: lm-eval tasks scored on a loaded (possibly edited) model in memory.

The local tasks live in `tasks/evaluate/lmeval/` (SST-2, AG News topic, held-out perplexity, GSM8K,
HumanEval; all read `../shared/data`). Named suites (`cpu`, `full`) are in
`capability_profiles.yaml`; any lm-eval task name (`mmlu`, `glue`, ...) works too where
the hub is reachable. Scores come back flat, `{task}.{metric}` (lm-eval's `acc,none`
becomes `rlsedit_sst2.acc`, a filter name is kept: `rlsedit_gsm8k.exact_match.strict-match`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.config import ConfigError
from tasks.corpus import HeldoutArgs
from tasks.files import workdir_path, write_atomically
from tasks.models import cache_root

log = logging.getLogger("rlsedit.capability")

LMEVAL_DIR = Path(__file__).with_name("lmeval")
PROFILES_PATH = Path(__file__).with_name("capability_profiles.yaml")
LOCAL_PREFIX = "rlsedit_"
HELDOUT_TASK = "rlsedit_agnews_ppl"   # held-out token perplexity (`heldout_suite`)


@dataclass
class CapabilityArgs:
    """Which capability tasks to score per snapshot (profile None and no tasks: none)."""

    profile: str | None = None       # a name from capability_profiles.yaml (cpu, full)
    tasks: list[str] | None = None   # instead of the profile's tasks
    limit: int | None = None         # documents per task; None: the profile's
    batch_size: int = 8
    max_length: int | None = None    # context cap for lm-eval (None: the model's)
    allow_code_execution: bool = False  # HumanEval runs model-written code only if true
    data_dir: str = "../shared/data"  # read against $RLSEDIT_WORKDIR under `ray job submit`

    @property
    def enabled(self) -> bool:
        return bool(self.profile or self.tasks)


def profiles() -> dict[str, dict]:
    return yaml.safe_load(PROFILES_PATH.read_text())


def resolve_suite(args: CapabilityArgs) -> tuple[list[str], int | None]:
    """The task names and per-task limit that `args` selects. Unsafe tasks are dropped
    (with a warning) unless code execution is allowed."""
    limit = args.limit
    tasks = list(args.tasks or [])
    if args.profile:
        known = profiles()
        if args.profile not in known:
            raise ConfigError(f"unknown capability profile {args.profile!r}: use one of "
                              f"{sorted(known)}")
        tasks = tasks or list(known[args.profile]["tasks"])
        limit = limit if limit is not None else known[args.profile].get("limit")
    if not args.allow_code_execution and "rlsedit_humaneval" in tasks:
        log.warning("skipping rlsedit_humaneval: it executes model-written code; set "
                    "capability.allow_code_execution=true to run it")
        tasks.remove("rlsedit_humaneval")
    local = {p.stem for p in LMEVAL_DIR.glob("*.yaml")}
    unknown = [t for t in tasks if t.startswith(LOCAL_PREFIX) and t not in local]
    if unknown:
        raise ConfigError(f"unknown local capability task(s) {unknown}: "
                          f"tasks/evaluate/lmeval has {sorted(local)}")
    return tasks, limit


def suite_key(args: CapabilityArgs) -> str:
    """What fixes a suite's scores on a given model: tasks, limit, lengths."""
    tasks, limit = resolve_suite(args)
    return json.dumps({"tasks": tasks, "limit": limit, "max_length": args.max_length})


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": x, "acc_stderr,none": s, ...}} → {"task.acc": x}."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            name = f"{task}.{metric}" + ("" if filter_name == "none" else f".{filter_name}")
            flat[name] = float(value)
    return flat


class CapabilitySuite:
    """lm-eval around one loaded model, kept across calls: write a snapshot's weights into
    `lm.model` and call `score()` again; nothing is reloaded."""

    def __init__(self, lm, args: CapabilityArgs, metadata: dict | None = None):
        """`metadata`: settings for the local tasks' loaders besides the data folder and
        the model's tokenizer, which every suite passes."""
        from tasks.evaluate.shared_context import SharedContextHFLM

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data: no hub round trip
        self.args = args
        self.metadata = {"data_dir": workdir_path(args.data_dir),
                         "tokenizer": str(lm.tokenizer_folder()), **(metadata or {})}
        self.tasks, self.limit = resolve_suite(args)
        kwargs = {"max_length": args.max_length} if args.max_length else {}
        self.hflm = SharedContextHFLM(pretrained=lm.model, tokenizer=lm.tokenizer,
                         batch_size=args.batch_size, **kwargs)
        self._manager = None
        self._specs = None

    @property
    def manager(self):
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            needs_hub_tasks = any(not t.startswith(LOCAL_PREFIX) for t in self.tasks)
            self._manager = TaskManager(include_path=str(LMEVAL_DIR),
                                        include_defaults=needs_hub_tasks,
                                        metadata=self.metadata)
        return self._manager

    @property
    def task_specs(self) -> list:
        """What `score` hands lm-eval: the local tasks built once (their documents read and
        prepared once per suite, not per call), other names as they are."""
        if self._specs is None:
            self._specs = [self.manager.load(t)["tasks"][t] if t.startswith(LOCAL_PREFIX)
                           else t for t in self.tasks]
        return self._specs

    def score(self) -> dict[str, float]:
        """Flat scores of every task in the suite on the model as it is now."""
        from lm_eval import simple_evaluate

        if not self.tasks:
            return {}
        out = simple_evaluate(model=self.hflm, tasks=self.task_specs, task_manager=self.manager,
                              limit=self.limit, bootstrap_iters=0, log_samples=False,
                              confirm_run_unsafe_code=self.args.allow_code_execution,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0)
        return flatten_results(out["results"])


def heldout_suite(lm, heldout: HeldoutArgs, batch_size: int = 16) -> CapabilitySuite:
    """lm-eval's held-out perplexity task (`rlsedit_agnews_ppl`) over `heldout`'s texts and
    cut: `heldout_perplexity` of it is the evaluator's `perplexity`."""
    return CapabilitySuite(lm, CapabilityArgs(tasks=[HELDOUT_TASK], batch_size=batch_size),
                           metadata={"heldout_corpus": workdir_path(heldout.corpus),
                                     "heldout_offset": heldout.offset,
                                     "heldout_texts": heldout.n_texts,
                                     "max_tokens": heldout.max_tokens})


def heldout_perplexity(suite: CapabilitySuite) -> float:
    """exp of the mean NLL per scored token of the held-out texts, on the model as it is."""
    return suite.score()[f"{HELDOUT_TASK}.token_perplexity"]


def unedited_capability(suite: CapabilitySuite, model_name: str) -> dict[str, float]:
    """The unedited model's suite scores, computed once per model and suite, cached on
    disk. Call it before any snapshot is written into the model."""
    key = json.dumps([model_name, suite_key(suite.args)])
    path = cache_root() / "capability" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return json.loads(path.read_text())["scores"]
    scores = suite.score()
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps({"key": key, "scores": scores})))
    return scores
