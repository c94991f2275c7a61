"""One writer per folder, with real processes: a live holder is named in the refusal, a
holder killed with SIGKILL leaves a lock that is taken over, and a lock nobody has touched
for STALE_SECONDS (a holder on another host) is taken over too."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tasks import lock
from tasks.lock import LOCK_NAME, LockHeld, folder_lock
from tests.conftest import ROOT

HOLDER = """
import pathlib, sys, time
from tasks.lock import lock_file
with lock_file(pathlib.Path(sys.argv[1]), "a test"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(path) -> subprocess.Popen:
    """A separate process that takes the lock file `path` and keeps it (kill it to end)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def holder(tmp_path):
    process = hold(tmp_path / "out" / LOCK_NAME)
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_is_taken_over(
        holder, tmp_path):
    folder = tmp_path / "out"
    tic = time.perf_counter()
    with pytest.raises(LockHeld, match=rf"output folder {folder} is busy: pid {holder.pid} "
                                       rf"on \S+, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"):
        with folder_lock(folder):
            pass
    assert time.perf_counter() - tic < 1, "refused at once"

    holder.send_signal(signal.SIGKILL)   # a crash: no clean-up, the lock file stays
    holder.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid
    with folder_lock(folder) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists(), "released at the end of the block"


def test_a_lock_untouched_for_long_is_stale_wherever_its_holder_ran(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "then",
                                "command": "python -m pipelines.grid", "token": "t"}))
    with pytest.raises(LockHeld, match="pid 1 on another-host"):   # its heartbeat is fresh
        lock.acquire(path, "folder")
    old = time.time() - lock.STALE_SECONDS - 5
    os.utime(path, (old, old))
    with folder_lock(tmp_path):
        assert json.loads(path.read_text())["host"] != "another-host"
