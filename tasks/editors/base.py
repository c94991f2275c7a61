"""The interface every editor implements, and the base of the key/value editors.

An editor is built from the edited layers' weights W0 [d_k, d_v] (W = linear.weight.T) and
the anchor statistics of those layers, then applies one batch of edits at a time:

- `needs == "keys_values"`: `update(layer, K, V) -> ΔW`, K [u, d_k] keys and V [u, d_v]
  target values from `tasks/extract` (the same extraction for every such editor);
- `needs == "loss"`: `update(loss_of) -> {layer: ΔW}`, where `loss_of({layer: W})` is the
  batch's edit loss with those weights in place (fine-tuning).

`weight(layer)` is the current W; `state_dict()` / `load_state_dict()` checkpoint it all.
Editors are tensor math only: no model, Ray or MLflow in here.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Editor(Protocol):
    """What every editor is (`build_editor` returns one); `update` differs by `needs`."""

    needs: str

    def weight(self, layer: int) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise when `tensor` holds a NaN or Inf. Any of them makes the sum NaN or Inf, so one
    reduction with no temporary screens the tensor (`isfinite` allocates about 1.4 copies
    of it); only a sum that is not finite is looked at element by element."""
    if torch.isfinite(tensor.sum()):
        return
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:   # else the finite entries' sum merely overflowed
        raise ValueError(f"{name} holds {bad} NaN/Inf values; refusing to update the editor state")


def check_batch(K: torch.Tensor, V: torch.Tensor, d_k: int, d_v: int) -> None:
    """K must be [u, d_k] and V [u, d_v], both finite."""
    if K.dim() != 2 or K.shape[1] != d_k:
        raise ValueError(f"K must be [u, {d_k}], got {tuple(K.shape)}")
    if V.shape != (K.shape[0], d_v):
        raise ValueError(f"V must be [{K.shape[0]}, {d_v}] to match K, got {tuple(V.shape)}")
    check_finite("K", K)
    check_finite("V", V)


class LayerWeights:
    """Keeps W [d_k, d_v] per edited layer in the editor's precision and checkpoints it;
    `extra_state` / `load_extra_state` carry whatever else a subclass keeps."""

    def __init__(self, weights: dict[int, torch.Tensor], dtype: str):
        self.dtype = getattr(torch, dtype)
        for layer, W0 in weights.items():
            check_finite(f"W0 of layer {layer}", W0)
        self.W = {layer: W0.detach().to(self.dtype).clone() for layer, W0 in weights.items()}

    def weight(self, layer: int) -> torch.Tensor:
        return self.W[layer]

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"W": dict(self.W), **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.W = {int(layer): W for layer, W in state["W"].items()}
        self.load_extra_state(state)


class KeyValueEditor(LayerWeights):
    """A subclass gives `delta(layer, K, V)` and may remember the batch (`after_update`),
    or replaces the whole fold of a checked batch (`fold`)."""

    needs = "keys_values"

    def delta(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_update(self, layer: int, K: torch.Tensor) -> None:
        pass

    def update(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Fold in one batch, K [u, d_k], V [u, d_v]; returns ΔW [d_k, d_v]. A batch that
        fails a check leaves the state as it was."""
        W = self.W[layer]
        check_batch(K, V, *W.shape)
        return self.fold(layer, K.to(W), V.to(W))

    def fold(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Fold in a checked batch, K [u, d_k] and V [u, d_v] in W's dtype and device:
        W ← W + `delta`, unless ΔW [d_k, d_v] is not finite; returns ΔW."""
        delta_W = self.delta(layer, K, V)
        check_finite("updated W", delta_W)
        self.W[layer] = self.W[layer] + delta_W
        self.after_update(layer, K)
        return delta_W
