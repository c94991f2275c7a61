"""The one exception class for mistakes a user can fix (bad data, config, paths, devices,
checkpoints, tracking server). Drivers print it as one line, without a traceback
(`pipelines.driver.one_line_errors`). Raise it where the cause is known, so the message
can say what is wrong and what to do; `read_user_text`, `require_file` and
`check_writable` do so for the files and folders a user names, `brief` quotes a library's
error."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


def read_user_text(path: str | Path, what: str, fix: str = "check the path") -> str:
    """The UTF-8 text of `path`, a file the user named (`what` says which: "edit data",
    "config file"); a UserError naming it when it is missing, a folder, unreadable or not
    UTF-8. `fix` says what to do about a path that does not lead to a readable file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start:,} is "
                        f"0x{err.object[err.start]:02x}): save it as UTF-8") from None
    except OSError as err:
        why = (err.strerror or type(err).__name__).lower()
        raise UserError(f"cannot read {what} {path}: {why}; {fix}") from None


def brief(err: BaseException, limit: int = 300) -> str:
    """A library's error message `err` as one line to quote in a UserError: whitespace
    collapsed, and cut at a word boundary with " …" when over `limit` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def require_file(path: str | Path, what: str, fix: str) -> None:
    """A UserError naming `path` (`what`, `fix` as for `read_user_text`) unless it is a
    file; the file itself is not read."""
    if not Path(path).is_file():
        read_user_text(path, what, fix)   # raises, saying what is wrong with it


def check_writable(path: str | Path, what: str, fix: str, folder: bool = True) -> None:
    """A UserError unless the folder (or, `folder=False`, the file) `path` exists or could
    be created, and be written to; `what` names it, `fix` says what to do. Creates
    nothing: it looks at the nearest part of `path` that exists."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and path.is_dir() != folder:
        why = "it is a file, not a folder" if folder else "it is a folder, not a file"
    elif existing != path and not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    elif not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    else:
        return
    raise UserError(f"cannot write {what} {path}: {why}; {fix}")
