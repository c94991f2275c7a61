"""Editors: pure tensor math that turns keys K [u, d_k] and values V [u, d_v] into new W."""

from tasks.editors.rls import RLSArgs, RLSEditor

EDITORS = {"rlsedit": (RLSEditor, RLSArgs)}


def editor_class(name: str):
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}: choose one of {sorted(EDITORS)}")
    return EDITORS[name]
