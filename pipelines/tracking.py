"""The MLflow tracking store, for every driver: created safely when several processes
start at once (`open_tracking`), checked before anything is written (`check_tracking`),
runs only resumed in the store they live in (`check_store`), experiments marked as model
training and the closing message naming the UI page of their runs and charts
(`how_to_open`); `Tracker` creates runs (a child under a parent where there is one) and
logs params, metrics at step = edits applied, dicts and files, the same way for a stream,
a grid cell and a re-evaluation.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit

from tasks.config import flatten
from tasks.errors import UserError, check_writable

TRACKING_CONNECT_SECONDS = 10.0   # MLflow itself retries a dead server for minutes
# MLflow 3 marks an experiment's kind with this tag: "custom_model_development" is model
# training ("Machine learning"), not GenAI. The UI opens an experiment on its runs or on
# traces by this kind where its GenAI/Model-training switch is off; in 3.17 the switch is
# on and decides alone, so the address `experiment_page` gives sets the switch
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, absolute; None for other stores."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]).resolve() if uri.startswith(prefix) else None


def tracking_store() -> str:
    """The tracking store in use (MLFLOW_TRACKING_URI or MLflow's default), local paths
    made absolute so that one store has one name whatever the current folder."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if (path := _sqlite_path(uri)) is not None:
        return f"sqlite:///{path}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def _creation_lock():
    """A file lock beside a SQLite store: its first use runs MLflow's schema creation,
    which fails ('table already exists', 'duplicate column') when several processes
    do it at once. Other stores create themselves safely (a server) or are per-path."""
    path = _sqlite_path(tracking_store())
    if path is None:
        return nullcontext()

    @contextmanager
    def locked():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(f"{path}.lock", "w")
        except OSError as err:   # a place `check_tracking` could not tell from outside
            raise UserError(f"cannot create the MLflow tracking store {path}: {err.strerror}; "
                            f"{TRACKING_FIX}") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)   # released when closed, or when the process dies
            yield

    return locked()


TRACKING_FIX = ("set MLFLOW_TRACKING_URI to sqlite:///PATH (a file you can write), a "
                "folder, or the http(s):// address of a running MLflow server")


def check_tracking(timeout_s: float = TRACKING_CONNECT_SECONDS) -> None:
    """Before anything is written, a UserError when the tracking store cannot be used: an
    unknown URI scheme, a local store where nothing can be written, a server that cannot
    be reached within `timeout_s` (MLflow would retry for minutes). Creates nothing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    uri = tracking_store()
    scheme = urlsplit(uri).scheme
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        raise UserError(f"the MLflow tracking store {uri} (MLFLOW_TRACKING_URI) has an unknown "
                        f"scheme {scheme!r}: {TRACKING_FIX}") from None
    if (path := _sqlite_path(uri)) is not None or scheme == "file":
        check_writable(path or Path(urlsplit(uri).path), "the MLflow tracking store",
                       TRACKING_FIX, folder=path is None)
    elif scheme in ("http", "https"):
        if (why := _server_problem(uri, timeout_s)) is not None:
            raise UserError(f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) {why}: "
                            f"start it (mlflow/README.md), or {TRACKING_FIX}")


def _server_problem(uri: str, timeout_s: float) -> str | None:
    """Why the MLflow server at `uri` cannot be used, or None when its health check (every
    MLflow server's `/health`) answers."""
    import requests

    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.Timeout:
        return f"does not answer within {timeout_s:.0f} s"
    except requests.RequestException as err:
        reason = getattr(err.args[0] if err.args else None, "reason", None) or err
        return f"cannot be reached ({str(reason).split(': ')[-1][:200]})"
    if answer.status_code in (401, 403):
        return (f"refuses access (HTTP {answer.status_code}): set MLFLOW_TRACKING_USERNAME "
                f"and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if not answer.ok:
        return f"does not answer as an MLflow server (HTTP {answer.status_code} on /health)"
    return None


def open_tracking(experiment: str | None = None):
    """Create the tracking store if needed, one process at a time; with `experiment`, make
    it the active experiment (created if missing, and marked as model training unless it
    has a kind) and return it."""
    import mlflow

    with _creation_lock():
        client = mlflow.MlflowClient()
        client.search_experiments(max_results=1)   # creates a fresh store
        if not experiment:
            return None
        _mark_kind(client, experiment)
        return mlflow.set_experiment(experiment)


def _mark_kind(client, experiment: str) -> None:
    """Create `experiment` marked as model training, or mark it if it has no kind."""
    from mlflow.exceptions import MlflowException

    tag, kind = EXPERIMENT_KIND
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            client.create_experiment(experiment, tags={tag: kind})
        except MlflowException as err:   # another process (a server store) was first
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    elif tag not in found.tags:
        client.set_experiment_tag(found.experiment_id, tag, kind)


MLFLOW_UI = "http://127.0.0.1:5000"   # where `mlflow ui` serves by default


def experiment_page(experiment_id: str, base: str = MLFLOW_UI) -> str:
    """The address of an experiment's runs in MLflow's chart view. The UI's own switch
    between "GenAI" and "Model training" (remembered by the browser, GenAI at first)
    decides what an experiment opens on; the address sets it to model training."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&compareRunsMode=CHART")


def how_to_open(run_id: str) -> str:
    """Two lines that open MLflow run `run_id`'s experiment: the server, the page."""
    import mlflow

    store = tracking_store()
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    if store.startswith(("http://", "https://")):
        return f"its charts: {experiment_page(experiment_id, store)}"
    return (f"open it with: mlflow ui --backend-store-uri {store}\n"
            f"its charts: {experiment_page(experiment_id)}")


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    open_tracking()
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def check_store(state: dict, run_id: str | None, folder: Path) -> None:
    """Refuse to resume `folder`, whose resume `state` holds MLflow run `run_id`, in another
    tracking store than the one that run lives in (`state["tracking_store"]`); record the
    store in `state` once it is known. State from before stores were recorded is accepted
    when the store has the run."""
    if run_id is None:   # nothing logged yet: any store will do
        return
    store, recorded = tracking_store(), state.get("tracking_store")
    if recorded is None:
        if not _run_exists(run_id):
            raise UserError(f"{folder} holds MLflow run {run_id}, which the tracking store "
                            f"{store} does not have: set MLFLOW_TRACKING_URI to the store it "
                            f"was logged to, or give a new output_dir to start over here")
        recorded = state["tracking_store"] = store
    if recorded != store:
        raise UserError(f"{folder} holds MLflow runs of the tracking store {recorded}, not of "
                        f"{store}: set MLFLOW_TRACKING_URI={recorded} to go on there, or give "
                        f"a new output_dir to start over in {store}")


def log_metrics(client, run_id: str, metrics: dict, step: int) -> None:
    """The numeric entries of `metrics` as one MLflow batch at `step`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    if batch:
        client.log_batch(run_id, metrics=batch)


class Tracker:
    """A driver's MLflow runs in one experiment, through one client: a run made with its
    params and config (a child where a parent is named), then metrics at step = edits
    applied, dicts and files."""

    PARAMS_PER_CALL = 100   # MLflow's limit per log_batch

    def __init__(self, experiment: str):
        from mlflow import MlflowClient

        self.experiment_id = open_tracking(experiment).experiment_id
        self.client = MlflowClient()

    def new_run(self, name: str, config: dict, parent: str | None = None,
                params: dict | None = None, config_file: str = "config.json") -> str:
        """A new run called `name`: `params` (default: the flattened `config`; values cut
        to MLflow's 6,000 characters) and `config` whole as the artifact `config_file`; its
        id."""
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": parent} if parent else None
        run_id = self.client.create_run(self.experiment_id, run_name=name,
                                        tags=tags).info.run_id
        params = [Param(k, str(v)[:6000])
                  for k, v in (flatten(config) if params is None else params).items()]
        for start in range(0, len(params), self.PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=params[start:start + self.PARAMS_PER_CALL])
        self.client.log_dict(run_id, config, config_file)
        return run_id

    def metrics(self, run_id: str, metrics: dict, step: int) -> None:
        log_metrics(self.client, run_id, metrics, step)

    def dict(self, run_id: str, data: dict, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def file(self, run_id: str, location, folder: str | None = None) -> None:
        """The file at `location` (a `tasks.storage.Location`: local, or in object storage,
        fetched for the upload) as an artifact of run `run_id`, under `folder`."""
        with location.local_copy() as path:
            self.client.log_artifact(run_id, str(path), folder)

    def end(self, run_id: str) -> None:
        self.client.set_terminated(run_id)
