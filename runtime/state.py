"""Every state of a batch of sequences, in buffers allocated once per generation.

Attention layers keep key/value slots [B, Hkv, capacity, D] plus one key mask [B, capacity] shared
by all of them (every attention layer sees the same tokens). A row's tokens need not fill its slots
from 0: prompts of different lengths are right-aligned (left padding), and speculative drafts that
were rejected leave masked holes; positions for RoPE travel separately, per row. DeltaNet layers keep
conv_state and the float32 recurrent state [B, ...], overwritten in place each step.

Which input carries which state comes from the manifest's ports (role and `state`; export/manifest.py),
so this module knows no layer type by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen3next_trt.export.manifest import GraphRecord, Role
from qwen3next_trt.sessions import host_dtype


@dataclass
class Slot:
    input: str  # the graph's state-in port
    output: str  # the state-out port carrying the same state
    buffer: np.ndarray
    grows: bool  # key/value: new tokens append slots along axis 2


class StateStore:
    def __init__(self, records: list[GraphRecord], batch: int, capacity: int):
        self.batch, self.capacity = batch, capacity
        self.layers: list[list[Slot]] = []
        self.attention: list[bool] = []
        for rec in records:
            out_of_state = {o.state: o.name for o in rec.outputs if o.role == Role.STATE_OUT}
            slots = []
            for p in rec.inputs:
                if p.role != Role.STATE_IN:
                    continue
                if p.grows and p.shape.index("past") != 2:
                    raise ValueError(f"{rec.name}: {p.name}: expected the past dim on axis 2, got {p.shape}")
                shape = [batch if d == "batch" else capacity if d == "past" else d for d in p.shape]
                slots.append(Slot(p.name, out_of_state[p.state], np.zeros(shape, host_dtype(p.dtype)), p.grows))
            self.layers.append(slots)
            self.attention.append(rec.is_attention)
        self.mask = np.zeros((batch, capacity), np.bool_)

    @property
    def nbytes(self) -> int:
        return sum(s.buffer.nbytes for slots in self.layers for s in slots) + self.mask.nbytes

    def feed(self, layer: int, rows: np.ndarray, lo: int, hi: int) -> dict:
        """The layer's state inputs for `rows`: key/value slots lo..hi, whole DeltaNet states."""
        return {s.input: s.buffer[rows, :, lo:hi] if s.grows else s.buffer[rows] for s in self.layers[layer]}

    def mask_feed(self, rows: np.ndarray, lo: int, hi: int, new: int) -> np.ndarray:
        return self.mask[rows, lo : hi + new]

    def write(self, layer: int, rows: np.ndarray, outs: dict, at: int, new: int) -> None:
        """Store a graph's state outputs: the `new` last key/value slots at `at`, DeltaNet states whole."""
        for s in self.layers[layer]:
            out = outs[s.output]
            if s.grows:
                s.buffer[rows, :, at : at + new] = out[:, :, out.shape[2] - new :]
            else:
                s.buffer[rows] = out

    def snapshot(self, layers: list[int], rows: np.ndarray) -> dict:
        """Copies of the given layers' whole (non-growing) states for rows: what a rollback restores."""
        return {i: [s.buffer[rows].copy() if not s.grows else None for s in self.layers[i]] for i in layers}

    def restore(self, snap: dict, rows: np.ndarray, which: np.ndarray) -> None:
        """Put back the snapshot's entries `which` (indices into the snapshot's rows) into `rows`."""
        for i, saved in snap.items():
            for s, arr in zip(self.layers[i], saved):
                if arr is not None:
                    s.buffer[rows] = arr[which]
