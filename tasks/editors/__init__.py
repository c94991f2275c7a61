"""Editors by name: `tasks/editors/editors.yaml` maps a name to an update rule (`kind`) and
its hyper-parameters; `build_editor` turns a name (plus overrides) into a ready editor."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

from tasks.config import ConfigError, from_dict, to_dict
from tasks.editors.alphaedit import AlphaEditArgs, AlphaEditEditor
from tasks.editors.base import Editor
from tasks.editors.ft import FTArgs, FTEditor
from tasks.editors.memit import MEMITArgs, MEMITEditor
from tasks.editors.rls import RLSArgs, RLSEditor

KINDS: dict[str, tuple[type[Editor], type]] = {
    "rls": (RLSEditor, RLSArgs),
    "memit": (MEMITEditor, MEMITArgs),
    "alphaedit": (AlphaEditEditor, AlphaEditArgs),
    "ft": (FTEditor, FTArgs),
}
REGISTRY_PATH = Path(__file__).with_name("editors.yaml")


@functools.cache
def _parsed_registry() -> dict[str, dict]:
    return yaml.safe_load(REGISTRY_PATH.read_text())


def editor_registry() -> dict[str, dict]:
    """{editor name: its settings} of editors.yaml, read once per process: each call
    hands out a copy of its own, free to change."""
    return copy.deepcopy(_parsed_registry())


def resolve_editor(name: str, overrides: dict | None = None):
    """(editor class, typed args, the resolved settings as a dict) for editor `name`."""
    entries = editor_registry()
    if name not in entries:
        raise ConfigError(f"unknown editor {name!r}: choose one of {sorted(entries)} "
                         f"(defined in {REGISTRY_PATH})")
    settings = dict(entries[name])
    kind = settings.pop("kind")
    editor_cls, args_cls = KINDS[kind]
    args = from_dict(args_cls, {**settings, **(overrides or {})}, where="editor_args.")
    return editor_cls, args, {"name": name, "kind": kind, **to_dict(args)}


def build_editor(name: str, weights: dict, anchors: dict,
                 overrides: dict | None = None) -> Editor:
    """Editor `name` on `weights` {layer: W0 [d_k, d_v]} and `anchors` {layer: AnchorStats}."""
    editor_cls, args, _ = resolve_editor(name, overrides)
    return editor_cls(weights, anchors, args)
