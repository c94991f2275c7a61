"""Run state on disk and in a real S3-compatible server (moto, on 127.0.0.1): the same calls,
atomic writes, the previous file kept, URIs joined with their settings, one driver per
folder."""

import os
import re

import pytest

from tasks.files import workdir_path
from tasks.lock import LockHeld, folder_lock
from tasks.storage import Location


@pytest.fixture(params=["disk", "s3"])
def folder(request, tmp_path) -> Location:
    """An empty folder of run state, on disk or in the test bucket."""
    if request.param == "disk":
        return Location(tmp_path / "run")
    return Location(request.getfixturevalue("s3_folder")(f"storage-{tmp_path.name}"))


def test_files_are_written_whole_and_read_back(folder):
    state = folder / "cells" / "a" / "state.json"
    assert not state.exists()
    state.write_text('{"n": 1}')
    assert state.exists() and state.read_text() == '{"n": 1}'

    def broken(tmp):
        tmp.write_text('{"n": 2, "half')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        state.write_with(broken)
    assert state.read_text() == '{"n": 1}', "a failed write leaves the file as it was"
    with state.local_copy() as local:
        assert local.name == "state.json" and local.read_text() == '{"n": 1}'


def test_a_write_can_keep_the_file_before_it(folder):
    latest, previous = folder / "checkpoint.pt", folder / "checkpoint.prev.pt"
    latest.write_with(lambda tmp: tmp.write_bytes(b"first"), keep=previous)
    assert not previous.exists()
    latest.write_with(lambda tmp: tmp.write_bytes(b"second"), keep=previous)
    latest.write_with(lambda tmp: tmp.write_bytes(b"third"), keep=previous)
    assert latest.read_bytes() == b"third" and previous.read_bytes() == b"second"


def test_staged_files_land_in_the_folder(folder):
    with folder.staging() as local:
        (local / "metrics.png").write_bytes(b"png")
        (local / "tables").mkdir()
        (local / "tables" / "comparison.md").write_text("| a |")
    assert (folder / "metrics.png").read_bytes() == b"png"
    assert (folder / "tables" / "comparison.md").read_text() == "| a |"


def test_a_uri_keeps_its_settings_when_joined(s3_folder, tmp_path):
    uri = s3_folder("joined")
    cell = Location(uri) / "cells" / "x-s0"
    base, query = uri.split("?")
    assert str(cell) == f"{base}/cells/x-s0?{query}" and cell.name == "x-s0"
    assert Location(str(cell)) == cell, "a cell folder travels to a Ray actor as a string"
    assert workdir_path(uri) == uri and Location(uri).resolve() == Location(uri)
    with pytest.raises(TypeError, match="is not a local path"):
        os.fspath(cell)
    local = Location(f"file://{tmp_path}/run")
    assert local.local == tmp_path / "run" and os.fspath(local / "a") == f"{tmp_path}/run/a"


def test_one_driver_per_folder_in_object_storage(s3_folder):
    folder = Location(s3_folder("locked"))
    with folder_lock(folder):
        with pytest.raises(LockHeld, match=re.escape(f"output folder {folder} is busy")):
            with folder_lock(folder):
                pass
    with folder_lock(folder):   # released
        pass
    assert not (folder / "driver.lock").exists(), "the lock is a file on this machine"


def test_an_output_folder_in_a_missing_bucket_is_refused_before_anything_is_written(s3_folder):
    from tasks.errors import UserError
    from tasks.preflight import check_output

    check_output(Location(s3_folder("fine")))
    missing = Location(s3_folder("x").replace("rlsedit-test", "no-such-bucket"))
    with pytest.raises(UserError, match="bucket no-such-bucket .* does not exist: create it"):
        check_output(missing)
