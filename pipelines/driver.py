"""What every driver (grid, stream, reeval) does around its work, so a re-run or a second
run never strands the user:

- a user's mistake ends the run with one line, no traceback (`one_line_errors`; `--debug`
  shows it), command-line mistakes included (`argument_parser`), and the tracking store and
  the Ray cluster are checked before anything is written (`check_tracking`, `check_ray`);
- the log says what the project does, not what its libraries do on every start
  (`setup_logging`);
- every driver reads its config one way: `--config FILE`, `--set key=value` and flags as
  shortcuts for keys (`read_config`);
- a Ray cluster that does not answer is reported within RAY_CONNECT_SECONDS (`join_ray`).

One writer per output folder is `tasks.lock.folder_lock`; the MLflow side of every
driver is `pipelines/tracking.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from tasks.config import load_yaml, set_override
from tasks.errors import UserError
from tasks.lock import LockHeld

log = logging.getLogger("rlsedit.driver")
RAY_CONNECT_SECONDS = 15.0   # a live head answers in well under a second, even when busy


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


@dataclass(frozen=True)
class Flag:
    """A command-line shortcut for a config key: `--<name> VALUE` does what
    `--set <key>=VALUE` does (the value read as YAML, through `template`)."""

    name: str                  # the flag without dashes, `_` for `-`: num_edits
    key: str                   # the config key it sets: num_edits, capability.profile
    help: str | None = None
    switch: str | None = None  # a flag without a value that sets `key` to this YAML
    repeat: bool = False       # repeatable; its values (kept as text) make a list
    template: str = "{}"       # the YAML the value makes: "[{}]" for 4,5,6

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def config_parser(module: str, doc: str, flags: tuple[Flag, ...] = (),
                  config_help: str = "YAML file of the config's keys",
                  config_required: bool = False) -> argparse.ArgumentParser:
    """Every driver's command line: `--config FILE`, `--set KEY=VALUE` (repeatable, applied
    last) and `flags`, shortcuts for keys; read back with `read_config`."""
    parser = argument_parser(module, doc)
    parser.add_argument("--config", required=config_required, help=config_help)
    for flag in flags:
        if flag.switch is not None:
            parser.add_argument(flag.option, dest=flag.name, action="store_true", help=flag.help)
        else:
            parser.add_argument(flag.option, dest=flag.name, help=flag.help,
                                action="append" if flag.repeat else "store")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. stream.num_edits=20 (repeatable)")
    return parser


def read_config(args: argparse.Namespace, flags: tuple[Flag, ...] = ()) -> dict:
    """The config `config_parser`'s `args` give: the `--config` file's keys, then the
    flags', then each `--set`."""
    data = load_yaml(args.config) if args.config else {}
    for flag in flags:
        value = getattr(args, flag.name)
        if value in (None, False):
            continue
        if flag.repeat:
            set_override(data, f"{flag.key}=[]")
            _node(data, flag.key)[flag.key.split(".")[-1]] = list(value)
        else:
            set_override(data, f"{flag.key}={flag.switch or flag.template.format(value)}")
    for assignment in args.set:
        set_override(data, assignment)
    return data


def _node(data: dict, key: str) -> dict:
    """The section of nested `data` that holds dotted `key`'s last part."""
    for part in key.split(".")[:-1]:
        data = data[part]
    return data


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
