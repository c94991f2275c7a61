"""One writer per folder: a lock file that names its holder and that a crash cannot leave
stuck.

    with folder_lock(out_dir):
        ...   # a second driver on out_dir is refused at once, naming this one

The lock is a file created exclusively (`O_EXCL`, so it works on any file system a cluster
shares) holding the holder's pid, host, start time and command; a thread touches it every
HEARTBEAT_SECONDS. A lock is stale, and taken over with a warning, when its holder ran on
this host and its pid is gone, or when its file has not been touched for STALE_SECONDS (a
holder on another host, or a reused pid).

Object storage has no exclusive create: a folder there (`s3://...`) is locked by a file on
this machine named after its URI (`machine_lock_path`), which keeps two drivers on one
machine apart but not drivers on two machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import UserError

log = logging.getLogger("rlsedit.lock")
LOCK_NAME = "driver.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0   # 20 missed heartbeats: the holder is gone, wherever it ran


class LockHeld(RuntimeError):
    """Another live process holds the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        return True
    return True


def _read(path: Path) -> dict | None:
    """The holder recorded in `path`; None when there is no file. A file being written
    (empty or partial) reads as a fresh holder with no details."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {}
    return {**holder, "age": age}


def stale_reason(holder: dict) -> str | None:
    """Why the lock of `holder` (as `_read` gives it) no longer holds; None while it does."""
    if holder.get("host") == socket.gethostname() and "pid" in holder \
            and not _pid_alive(holder["pid"]):
        return f"pid {holder['pid']} is gone"
    if holder["age"] > STALE_SECONDS:
        return f"not touched for {holder['age']:.0f} s"
    return None


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}, running `{holder.get('command', '?')}`")


def _create(path: Path, me: dict) -> bool:
    """Write `me` to `path` if no file is there; False when one is."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as err:   # a folder this user cannot write
        raise _cannot_write(path, err) from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    return True


def _cannot_write(path: Path, err: OSError) -> UserError:
    return UserError(f"cannot write the lock file {path}: {err.strerror or err}; choose a "
                     f"folder you can write to")


def acquire(path: Path, subject: str) -> dict:
    """Take the lock file `path` for this process (see the module docstring) and return the
    record written there; `LockHeld` says that `subject` is busy and names the holder, a
    UserError that the lock cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:   # a read-only place, a file where a folder should be
        raise _cannot_write(path, err) from None
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300],
          "token": uuid.uuid4().hex}
    for _ in range(3):   # a stale lock is removed once; a racing taker may beat us to it
        if _create(path, me):
            return me
        holder = _read(path)
        if holder is None:
            continue
        reason = stale_reason(holder)
        if reason is None:
            raise LockHeld(f"{subject} is busy: {describe(holder)}; wait for it to end "
                               f"or stop it (if it is gone, remove {path})")
        log.warning("taking over the stale lock %s of %s: %s", path, describe(holder), reason)
        _remove_if(path, holder.get("token"))
    raise LockHeld(f"could not take the lock {path}: other processes keep taking it")


def _remove_if(path: Path, token: str | None) -> None:
    """Remove the lock file if it still holds `token` (never another holder's lock)."""
    holder = _read(path)
    if holder is not None and holder.get("token") == token:
        path.unlink(missing_ok=True)


def _heartbeat(path: Path, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        holder = _read(path)
        if holder is None or holder.get("token") != token:
            log.warning("the lock %s was taken from this process", path)
            return
        os.utime(path)


def machine_lock_path(kind: str, key: str) -> Path:
    """A lock file on this machine, under the cache, for `key` (a tracking store, a URI)."""
    from tasks.models import cache_root

    return cache_root() / "locks" / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.lock"


def folder_lock(folder):
    """Hold `folder`'s lock while the block runs: LOCK_NAME in it, or for a folder in
    object storage (a `tasks.storage.Location` URI) a lock file on this machine."""
    from tasks.storage import Location

    local = Location(folder).local
    path = local / LOCK_NAME if local is not None else machine_lock_path("output", str(folder))
    return lock_file(path, f"output folder {folder}")


@contextmanager
def lock_file(path: Path, subject: str):
    """Hold the lock file `path` while the block runs; `subject` names what it guards in
    the refusal another process gets."""
    me = acquire(path, subject)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, me["token"], stop), daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        _remove_if(path, me["token"])
