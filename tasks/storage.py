"""Where a run keeps its state: a local folder or object storage.

`Location` is a file or folder under a run's `output_dir` (checkpoints, snapshots, resume
state, reports): a local path, or any URI `pyarrow.fs` understands (`s3://bucket/key`,
`gs://bucket/key`, `hdfs://...`; `file://` URIs are local paths). Settings in a URI's query
(`s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http`) stay on every location
joined under it, so a Ray actor given a cell's folder as a string reaches the same store.
Credentials come from each process's environment, as pyarrow reads them (AWS_* variables,
~/.aws, an instance role; GOOGLE_APPLICATION_CREDENTIALS or the metadata server).

Writes are atomic everywhere: a reader, or a run resumed after a kill, sees the old file
or the new one, never part of one. Locally through a per-process temporary file renamed
over the target (`tasks.files.write_atomically`, as before); on object storage by
serialising to a local temporary file first and uploading it in one go, since an object
appears only once its upload completes. Local behaviour is that of `pathlib.Path`, with the
files written atomically. Per-machine caches (anchor statistics, unedited scores, models)
stay on local disk and do not use this module.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from tasks.errors import brief
from tasks.files import is_uri, write_atomically

log = logging.getLogger("rlsedit.storage")


@lru_cache(maxsize=None)
def _filesystem(root: str):
    """The pyarrow file system of `root` (`scheme://netloc?query`) and the path of that
    netloc in it (a bucket), made once per process (an S3 store asks for its bucket's
    region)."""
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(root)


def _keep_local(path: Path, keep: Path) -> None:
    """Make `keep` the file `path` holds, leaving `path` in place (readers always find one):
    a hard link to it, or a rename where the file system has no hard links."""
    tmp = keep.with_name(f"{keep.name}.tmp{os.getpid()}")
    try:
        os.link(path, tmp)
    except OSError:
        os.replace(path, keep)
        return
    os.replace(tmp, keep)


class Location:
    """A file or folder of run state: a local `Path` (`.local`) or an object in a
    `pyarrow.fs` file system (`.fs`, `.fs_path`). `str()` gives it back as it was given,
    so it travels to other processes as a string."""

    def __init__(self, where: str | os.PathLike | Location):
        text = str(where) if isinstance(where, Location) else os.fspath(where)
        if text.startswith("file://"):
            text = urlsplit(text).path
        self.local: Path | None = None if is_uri(text) else Path(text)
        if self.local is None:
            scheme, netloc, path, query, _ = urlsplit(text)
            self._parts = (scheme, netloc, path.rstrip("/"), query)
            self.fs, root = _filesystem(urlunsplit((scheme, netloc, "", query, "")))
            root = root.strip("/")   # a bucket (s3, gs), or nothing (hdfs: absolute paths)
            self.fs_path = f"{root}{self._parts[2]}" if root else self._parts[2]

    def __str__(self) -> str:
        if self.local is not None:
            return str(self.local)
        scheme, netloc, path, query = self._parts
        return urlunsplit((scheme, netloc, path, query, ""))

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __fspath__(self) -> str:
        """The local path; object storage has none (read it through `local_copy`)."""
        if self.local is None:
            raise TypeError(f"{self} is not a local path")
        return str(self.local)

    def __truediv__(self, part: str) -> Location:
        if self.local is not None:
            return Location(self.local / part)
        scheme, netloc, path, query = self._parts
        return Location(urlunsplit((scheme, netloc, f"{path}/{part}", query, "")))

    @property
    def name(self) -> str:
        return self.local.name if self.local is not None else self._parts[2].rsplit("/", 1)[-1]

    def resolve(self) -> Location:
        """Local paths made absolute; URIs as they are."""
        return Location(self.local.resolve()) if self.local is not None else self

    def mkdir(self) -> None:
        """Create the folder (and its parents) locally; object stores need no folders."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.exists()
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.fs_path).type != FileType.NotFound

    def read_bytes(self) -> bytes:
        if self.local is not None:
            return self.local.read_bytes()
        with self.fs.open_input_stream(self.fs_path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        """Write `text` atomically (see the module docstring)."""
        self.write_with(lambda tmp: tmp.write_text(text))

    def write_with(self, write: Callable[[Path], None], keep: Location | None = None) -> None:
        """Call `write(tmp)` on a local temporary file and make it this file, atomically.
        With `keep`, the file this one held before becomes `keep` (local: a hard link made
        once the new one is written; object storage: a copy in the store, made before the
        upload), so a damaged latest file leaves the one before it to fall back on."""
        if self.local is not None:
            def write_keeping(tmp: Path) -> None:
                write(tmp)
                if keep is not None and self.local.exists():
                    _keep_local(self.local, keep.local)
            write_atomically(self.local, write_keeping)
            return
        with tempfile.TemporaryDirectory(prefix="rlsedit-upload-") as folder:
            tmp = Path(folder) / self.name
            write(tmp)
            if keep is not None and self.exists():
                self._copy_to(keep)
            self._upload(tmp)

    def _copy_to(self, target: Location) -> None:
        """Copy this object to `target` in the store. S3 copies at most 5 GB in the one
        request pyarrow makes: a larger object is not copied, with a warning."""
        try:
            self.fs.copy_file(self.fs_path, target.fs_path)
        except OSError as err:
            log.warning("could not keep a copy of %s as %s (%s); only the newest is kept",
                        self, target.name, brief(err, 200))

    def _upload(self, path: Path) -> None:
        """Upload the local file `path` to this object (visible once complete)."""
        from pyarrow.fs import LocalFileSystem, copy_files

        copy_files(str(path), self.fs_path, source_filesystem=LocalFileSystem(),
                   destination_filesystem=self.fs)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This file as a local path while the block runs: itself when local, else a
        temporary download of the same name (for torch.load, MLflow's log_artifact)."""
        if self.local is not None:
            yield self.local
            return
        from pyarrow.fs import LocalFileSystem, copy_files

        with tempfile.TemporaryDirectory(prefix="rlsedit-download-") as folder:
            path = Path(folder) / self.name
            copy_files(self.fs_path, str(path), source_filesystem=self.fs,
                       destination_filesystem=LocalFileSystem())
            yield path

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A local folder for files meant for this folder (plots, tables): this folder
        itself when local, else a temporary one whose files are uploaded here, each
        atomically, when the block ends without an error."""
        if self.local is not None:
            self.mkdir()
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="rlsedit-stage-") as folder:
            yield Path(folder)
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    (self / path.relative_to(folder).as_posix())._upload(path)

