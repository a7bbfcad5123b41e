"""The exported graphs of one model, opened through one backend, and the passes over them.

A backend is a session factory (qwen3next_trt/sessions.py): `factory(record) -> session` where
`session.run(None, feed)` returns the outputs in the record's order. The graphs generation needs
come from the manifest (Manifest.generation_graphs), and their files are verified against its
hashes before any session opens. Nothing in this module imports torch, so a serving process stays light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3next_trt.export.manifest import PREFILL, Manifest, layer_graph_name
from qwen3next_trt.sessions import onnxrt_factory

from .state import StateStore


class GraphModel:
    """Sessions for embed, every layer (prefill + decode), final, and optionally lm_head + MTP."""

    def __init__(self, onnx_dir: str | Path, session_factory=None, manifest: Manifest | None = None, mtp: bool | None = None,
                 progress=None):
        """mtp: load the MTP graphs (True: required, None: when the export has them)."""
        self.dir = Path(onnx_dir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.dir)
        self.config = self.manifest.config
        self.n_layers = self.manifest.n_layers
        needed = self.manifest.generation_graphs(mtp)
        self.has_mtp = "mtp.decode" in needed
        self.records = {n: self.manifest.graph(n) for n in needed}
        self.manifest.verify(list(self.records.values()), progress)
        factory = session_factory or onnxrt_factory(self.dir)
        self.sessions = {n: factory(rec) for n, rec in self.records.items()}
        self.layer_records = [self.records[layer_graph_name(i, PREFILL)] for i in range(self.n_layers)]
        self.is_attention = [r.is_attention for r in self.layer_records]
        self.mtp_records = [self.records["mtp.prefill"]] if self.has_mtp else []

    # -- single graphs ---------------------------------------------------------------------------
    def run(self, name: str, feed: dict) -> dict:
        outs = self.sessions[name].run(None, feed)
        return dict(zip(self.records[name].output_names, outs))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.run("embed", {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})["hidden"]

    def final(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self.run("final", {"hidden": hidden})
        return outs["logits"], outs["hidden_normed"]

    def lm_head(self, hidden: np.ndarray) -> np.ndarray:
        return self.run("lm_head", {"hidden": hidden})["logits"]

    def new_store(self, batch: int, capacity: int) -> StateStore:
        return StateStore(self.layer_records, batch, capacity)

    def new_mtp_store(self, batch: int, capacity: int) -> StateStore:
        return StateStore(self.mtp_records, batch, capacity)

    # -- passes ----------------------------------------------------------------------------------
    def _stateful(self, name: str, layer: int, feed: dict, store: StateStore, rows, positions, past: tuple[int, int], T: int) -> dict:
        feed.update(store.feed(layer, rows, *past))
        if store.attention[layer]:
            feed["position_ids"] = np.ascontiguousarray(positions, dtype=np.int64)
            feed["attention_mask"] = store.mask_feed(rows, *past, T)
        outs = self.run(name, feed)
        store.write(layer, rows, outs, past[1], T)
        return outs

    def layer(self, i: int, mode: str, hidden, store: StateStore, rows, positions, past: tuple[int, int], T: int):
        """Layer i over hidden [n, T, H] for store rows `rows`: attention reads key/value slots
        past=(lo, hi) and writes T new ones at hi; DeltaNet reads and writes its state. Returns hidden."""
        return self._stateful(layer_graph_name(i, mode), i, {"hidden": hidden}, store, rows, positions, past, T)["hidden_out"]

    def mtp(self, next_ids, hidden, store: StateStore, rows, positions, past: tuple[int, int], mode: str):
        """The MTP layer at positions t for next tokens x_{t+1} [n, T] and the main model's normed
        hidden h_t [n, T, H], over an MTP store (slots as in `layer`). Returns its hidden [n, T, H]."""
        feed = {"next_embeds": self.embed(next_ids), "hidden": hidden}
        return self._stateful(f"mtp.{mode}", 0, feed, store, rows, positions, past, next_ids.shape[1])["mtp_hidden"]

    def prefill_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, T, V] of fresh sequences ids [B, T] (equal lengths) through the prefill graphs."""
        B, T = ids.shape
        store = self.new_store(B, T)
        store.mask[:] = True
        positions = np.broadcast_to(np.arange(T), (B, T))
        return self.forward(ids, store, np.arange(B), positions, (0, 0), PREFILL)[0]

    def forward(self, ids: np.ndarray, store: StateStore, rows, positions: np.ndarray, past: tuple[int, int], mode: str,
                keep_linear_inputs: bool = False):
        """embed -> every layer -> final for ids [n, T]. Returns (logits, hidden_normed, the DeltaNet
        layers' inputs {layer: hidden} when asked: what an exact rollback re-runs)."""
        T = ids.shape[1]
        hidden = self.embed(ids)
        kept = {}
        for i in range(self.n_layers):
            if keep_linear_inputs and not self.is_attention[i]:
                kept[i] = hidden
            hidden = self.layer(i, mode, hidden, store, rows, positions, past, T)
        logits, normed = self.final(hidden)
        return logits, normed, kept
