"""Atomic file writes for caches and checkpoints shared by several processes, and paths
read against the folder a job was submitted from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a per-process temporary file beside `path`, then rename it over
    `path`, so readers never see a half-written file and writers never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def is_uri(path: str) -> bool:
    """Whether `path` is a URI (`s3://bucket/key`, `file:///tmp/x`), not a plain path."""
    return "://" in path


def workdir_path(path: str | None) -> str | None:
    """`path` made absolute against $RLSEDIT_WORKDIR (else the current folder). Under `ray
    job submit` a driver runs in an unpacked copy of the tree, not where it was launched;
    cluster/submit_job.sh sets RLSEDIT_WORKDIR to the submitting folder. Hub names
    (`hub:...`), URIs (`s3://...`) and absolute paths are returned as they are."""
    if path is None or path.startswith("hub:") or is_uri(path) or Path(path).is_absolute():
        return path
    return str((Path(os.environ.get("RLSEDIT_WORKDIR", ".")) / path).resolve())
