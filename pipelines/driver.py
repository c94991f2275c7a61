"""What every driver (grid, stream, reeval) does around its work, so a re-run or a second
run never strands the user:

- a user's mistake ends the run with one line, no traceback (`one_line_errors`; `--debug`
  shows it), command-line mistakes included (`argument_parser`), and the tracking store and
  the Ray cluster are checked before anything is written (`check_tracking`, `check_ray`);
- the log says what the project does, not what its libraries do on every start
  (`setup_logging`);
- the MLflow tracking store is created safely when several processes start at once
  (`open_tracking`), experiments are marked as model training, the closing message names
  the UI page of their runs and charts (`how_to_open`), and a run is only resumed in the
  store its runs live in (`check_store`);
- a Ray cluster that does not answer is reported within RAY_CONNECT_SECONDS (`join_ray`).

One writer per output folder is `tasks.lock.folder_lock`.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import socket
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit

from tasks.errors import UserError, check_writable
from tasks.lock import LockHeld

log = logging.getLogger("rlsedit.driver")
RAY_CONNECT_SECONDS = 15.0   # a live head answers in well under a second, even when busy
TRACKING_CONNECT_SECONDS = 10.0   # MLflow itself retries a dead server for minutes
# MLflow 3 marks an experiment's kind with this tag: "custom_model_development" is model
# training ("Machine learning"), not GenAI. The UI opens an experiment on its runs or on
# traces by this kind where its GenAI/Model-training switch is off; in 3.17 the switch is
# on and decides alone, so the address `experiment_page` gives sets the switch
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# Library lines that say nothing a user acts on, by logger and how the line starts; every
# other line of these loggers, warnings and errors included, still shows.
QUIET_LINES = {
    # MLflow creating or migrating a SQLite store's tables on first use
    "mlflow.store.db.utils": ("Creating initial MLflow database tables",
                              "Updating database tables"),
    # a new local Ray cluster telling that it chose its default, token authentication (the
    # warning that a cluster runs *without* authentication still shows)
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",),
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def setup_logging() -> None:
    """A driver's log: the project's INFO lines with their time and source, without
    the QUIET_LINES of its libraries."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name, starts in QUIET_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))


USER_ERRORS = (UserError, LockHeld)   # config and data errors are UserErrors
USER_ERROR_EXIT = 2   # as argparse exits on a command-line mistake


class _Parser(argparse.ArgumentParser):
    """argparse that reports a command-line mistake as a UserError, not as usage lines."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of the driver `module` (`pipelines.grid`), described by the first line of
    its `doc`, with `--debug`."""
    parser = _Parser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--debug", action="store_true",
                        help="on a user error, show the traceback, not one line")
    return parser


@contextmanager
def one_line_errors(argv: list[str] | None = None):
    """Around a driver's `main(argv)`: a user error (`USER_ERRORS`, also when a Ray task or
    actor raised it) exits with status USER_ERROR_EXIT and `error: <message>` as one line
    on stderr, unless `--debug` is in `argv` (default: the command line): then it is
    raised with its traceback. Other exceptions pass as they are."""
    try:
        yield
    except USER_ERRORS as err:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        cause = getattr(err, "cause", err)   # a Ray task's error holds the original as cause
        print(f"error: {' '.join(str(cause).split())}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


# -- the MLflow tracking store ---------------------------------------------------------

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


def log_file(run_id: str, location, folder: str | None = None) -> None:
    """Log the file at `location` (a `tasks.storage.Location`: local, or in object storage,
    fetched for the upload) as an artifact of MLflow run `run_id`, under `folder`."""
    import mlflow

    with location.local_copy() as path:
        mlflow.MlflowClient().log_artifact(run_id, str(path), folder)


# -- the Ray cluster -------------------------------------------------------------------

def cluster_address(address: str | None) -> str | None:
    """The host:port of the cluster `ray.init(address)` would join (RAY_ADDRESS, `address`,
    or the last `ray start` on this machine); None when it would start a local one."""
    from ray._private.services import canonicalize_bootstrap_address

    if address in (None, "auto"):   # as ray.init reads it
        address = os.environ.get("RAY_ADDRESS") or address
    if address and "://" in address:   # ray://host:port is Ray Client; others ray.init refuses
        return address[len("ray://"):] if address.startswith("ray://") else None
    return canonicalize_bootstrap_address(address)


def no_answer(address: str, timeout_s: float) -> str | None:
    """Why the gRPC server at host:port (a Ray head) cannot be used, or None when it
    completes a connection within `timeout_s`: a head killed without `ray stop` refuses at
    once; a frozen or unreachable one stays silent."""
    import grpc

    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        return f"cannot be reached ({err.strerror or type(err).__name__})"
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        return f"does not answer within {timeout_s:.0f} s"
    finally:
        channel.close()
    return None


def check_ray(address: str | None, timeout_s: float = RAY_CONNECT_SECONDS) -> str | None:
    """The host:port of the cluster `ray.init(address)` would join (None: a new local
    one); a UserError naming it and how to go on when it cannot be reached within
    `timeout_s` (Ray itself would retry forever)."""
    target = cluster_address(address)
    if target is not None and (why := no_answer(target, timeout_s)):
        if address in (None, "auto"):   # found in RAY_ADDRESS or left by `ray start`
            fix = ("if it is gone, `ray stop` makes Ray forget it (and stops any Ray on this "
                   "machine), or set RAY_ADDRESS=local to run on a new local cluster")
        else:
            fix = "start it, or set ray_address=local to run on a new local cluster"
        raise UserError(f"the Ray cluster at {target} {why}: {fix}")
    return target


def join_ray(address: str | None, timeout_s: float = RAY_CONNECT_SECONDS) -> None:
    """`ray.init(address)`, once `check_ray` finds the cluster answers."""
    import ray

    target = check_ray(address, timeout_s)
    log.info("joining Ray at %s", target or "a new local cluster")
    ray.init(address=address, log_to_driver=False)
