"""What every driver (grid, stream, reeval) does around its work, so a re-run or a second
run never strands the user:

- a user's mistake ends the run with one line, no traceback (`one_line_errors`);
- the MLflow tracking store is created safely when several processes start at once
  (`open_tracking`), and a run is only resumed in the store its runs live in
  (`check_store`);
- a Ray cluster that does not answer is reported within RAY_CONNECT_SECONDS (`join_ray`).

One writer per output folder is `tasks.lock.folder_lock`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tasks.config import ConfigError
from tasks.lock import LockHeld

log = logging.getLogger("rlsedit.driver")
RAY_CONNECT_SECONDS = 15.0   # a live head answers in well under a second, even when busy


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


USER_ERRORS = (UserError, LockHeld, ConfigError)


@contextmanager
def one_line_errors():
    """Around a driver's `main`: a user error exits with its message as one line."""
    try:
        yield
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None


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
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)   # released when closed, or when the process dies
            yield

    return locked()


def open_tracking(experiment: str | None = None):
    """Create the tracking store if needed, one process at a time; with `experiment`, make
    it the active experiment (created if missing) and return it."""
    import mlflow

    with _creation_lock():
        mlflow.MlflowClient().search_experiments(max_results=1)   # creates a fresh store
        return mlflow.set_experiment(experiment) if experiment else None


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


def join_ray(address: str | None, timeout_s: float = RAY_CONNECT_SECONDS) -> None:
    """`ray.init(address)`, unless the cluster it would join cannot be reached within
    `timeout_s` (Ray itself would retry forever): then a UserError names the address and
    how to go on."""
    import ray

    target = cluster_address(address)
    if target is not None and (why := no_answer(target, timeout_s)):
        if address in (None, "auto"):   # found in RAY_ADDRESS or left by `ray start`
            fix = ("if it is gone, `ray stop` makes Ray forget it (and stops any Ray on this "
                   "machine), or set RAY_ADDRESS=local to run on a new local cluster")
        else:
            fix = "start it, or set ray_address=local to run on a new local cluster"
        raise UserError(f"the Ray cluster at {target} {why}: {fix}")
    log.info("joining Ray at %s", target or "a new local cluster")
    ray.init(address=address, log_to_driver=False)
