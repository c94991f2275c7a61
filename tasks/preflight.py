"""Checks of a stream's inputs that need no loaded model, made before anything is written
(no run folder, no MLflow run), so a mistake costs seconds, not a model load or a half-made
run: the names (model, editor and its settings, edit layers where the model's size is
known), the device, every record of the edit data (parsed, lengths capped, enough of them
from `offset`), the corpus files, what the evaluator reads (held-out texts, the
capability suite) and the output folder. A failure is a UserError that
says what to do. The checks against the model's tokenizer follow once it is loaded
(`tasks.stream.stream_requests`)."""

from __future__ import annotations

from pathlib import Path

from tasks.anchor import CORPUS_FIX
from tasks.config import from_dict
from tasks.data import load_requests
from tasks.editors import resolve_editor
from tasks.errors import UserError, brief, check_writable, read_user_text
from tasks.evaluate.neighbours import POOL_FIX
from tasks.models import check_layer_numbers, layer_count, resolve_device, resolve_spec
from tasks.stream import StreamConfig

OUTPUT_FIX = "give another output_dir (--output-dir or --set output_dir=...)"


def check_stream(cfg: StreamConfig, device_here: bool = True,
                 checked: set | None = None) -> None:
    """Check `cfg`'s inputs (see the module docstring). `device_here`: the device must be
    on this machine (a grid's actors choose theirs: only its name is checked). `checked`
    holds what was checked already, so the cells of a grid read each file once."""
    checked = set() if checked is None else checked
    resolve_spec(cfg.model)
    resolve_editor(cfg.editor, cfg.editor_args)
    resolve_device(cfg.device, here=device_here)
    if cfg.layers is not None and (count := layer_count(cfg.model)) is not None:
        check_layer_numbers(cfg.layers, count, cfg.model)
    data = (cfg.data, cfg.offset, cfg.num_edits, cfg.skip_bad_records, cfg.max_text_chars)
    if data not in checked:
        load_requests(cfg.data, limit=cfg.num_edits, offset=cfg.offset,
                      skipped=[] if cfg.skip_bad_records else None,
                      max_chars=cfg.max_text_chars)
        checked.add(data)
    check_file(cfg.anchor.corpus, "anchor corpus", CORPUS_FIX, checked)
    if cfg.neighbours.pool:
        check_file(cfg.neighbours.pool, "neighbour pool", POOL_FIX, checked)
    check_evaluation(cfg, checked)
    check_output(cfg.out_dir)


def check_evaluation(cfg: StreamConfig, checked: set) -> None:
    """What the evaluator reads besides the edits: the held-out corpus, and the capability
    suite's tasks and data folder."""
    from tasks.corpus import HeldoutArgs
    from tasks.evaluate.capability import CapabilityArgs, resolve_suite

    heldout = from_dict(HeldoutArgs, cfg.heldout, where="heldout.")
    check_file(heldout.corpus, "held-out corpus", "set heldout.corpus to a text<TAB>label file",
               checked)
    capability = from_dict(CapabilityArgs, cfg.capability, where="capability.")
    resolve_suite(capability)   # an unknown profile or local task fails here
    if capability.enabled and not Path(capability.data_dir).is_dir():
        raise UserError(f"capability.data_dir {capability.data_dir} is not a folder: set it "
                        f"to the folder holding the shared data (../shared/data)")


def check_file(path: str, what: str, fix: str, checked: set) -> None:
    """A UserError unless `path` is a readable UTF-8 file (read once per `checked`)."""
    if path not in checked:
        read_user_text(path, what, fix)
        checked.add(path)


def check_output(out_dir) -> None:
    """A UserError when the local output folder `out_dir` (a Path or a
    `tasks.storage.Location`) cannot be created or written, or when the bucket of one in
    object storage cannot be reached (no such bucket, a wrong endpoint, no credentials).
    Write permission in a bucket shows at the first write."""
    local = getattr(out_dir, "local", out_dir)
    if local is not None:
        check_writable(local, "the output folder", OUTPUT_FIX)
        return
    from pyarrow.fs import FileType

    bucket = out_dir.fs_path.split("/", 1)[0]
    try:
        found = out_dir.fs.get_file_info(bucket).type != FileType.NotFound
    except OSError as err:
        raise UserError(f"cannot reach the output folder {out_dir} "
                        f"({brief(err, 160)}): check its endpoint and "
                        f"credentials, or {OUTPUT_FIX}") from None
    if not found:
        raise UserError(f"the bucket {bucket} of the output folder {out_dir} does not "
                        f"exist: create it, or {OUTPUT_FIX}")
