"""The exported graphs of one model, opened through one backend, and the passes over them.

A backend is a session factory `factory(record) -> session` where `session.run(None, feed)` returns
the outputs in the record's order, as ONNX Runtime's InferenceSession does. Two ship here: ONNX
Runtime on the CPU (`onnxrt_factory`) and TensorRT engines (`engine_factory`, through
engines/runtime.py). Nothing in this module imports torch, so a serving process stays light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3next_trt.errors import InputError
from qwen3next_trt.export.manifest import read_manifest

from .state import StateStore

FLOAT8 = "tensor(float8e4m3fn)"
FLOAT8_ONNX = 17  # onnx.TensorProto.FLOAT8E4M3FN (onnx itself is not needed at run time)


# Environment knobs that put ONNX Runtime on other kernel paths (see validate/README.md, "Tolerances"):
# the test suite run under them shows whether a tolerance holds beyond this CPU's choice of kernels.
ORT_OPT_LEVEL_ENV = "QWEN3NEXT_TRT_ORT_OPT_LEVEL"  # 0 / 1 / 2 / 99: ORT's graph optimisation levels (fusions)
ORT_THREADS_ENV = "QWEN3NEXT_TRT_ORT_THREADS"  # intra-op threads when the caller does not choose


def session_options(threads: int | None = None):
    """The SessionOptions of every CPU session the project opens (runtime and validate alike)."""
    import os

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = threads or int(os.environ.get(ORT_THREADS_ENV, "0"))
    if threads:
        opts.intra_op_num_threads = threads
    level = os.environ.get(ORT_OPT_LEVEL_ENV)
    if level:
        levels = {"0": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "1": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "2": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "99": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if level not in levels:
            raise InputError(f"{ORT_OPT_LEVEL_ENV}={level}: expected one of {', '.join(levels)}")
        opts.graph_optimization_level = levels[level]
    return opts


class OrtSession:
    """An ONNX Runtime (CPU) session whose float8e4m3fn inputs and outputs travel as uint8 arrays of
    the same bits (numpy has no float8; an FP8 KV cache has such states)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.fp8_inputs = {i.name for i in self.session.get_inputs() if i.type == FLOAT8}
        self.has_fp8 = bool(self.fp8_inputs) or any(o.type == FLOAT8 for o in self.session.get_outputs())
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, names, feed: dict) -> list[np.ndarray]:
        if not self.has_fp8:
            return self.session.run(names, feed)
        OrtValue = self._ort.OrtValue
        values = {k: OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v, dtype=np.uint8), FLOAT8_ONNX)
                  if k in self.fp8_inputs else OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        return [o.numpy() for o in self.session.run_with_ort_values(names or self.output_names, values)]


def onnxrt_factory(onnx_dir: str | Path, threads: int | None = None):
    return lambda record: OrtSession(Path(onnx_dir) / record["file"], threads)


def engine_factory(engines_dir: str | Path):
    engines_dir = Path(engines_dir)

    def open_session(record: dict):
        path = engines_dir / f"{record['name']}.engine"
        if not path.is_file():
            raise InputError(f"{path}: not found: expected an engine for graph {record['name']!r} (qwen3next-trt build)")
        from qwen3next_trt.engines.runtime import EngineSession

        return EngineSession(path)

    return open_session


class GraphModel:
    """Sessions for embed, every layer (prefill + decode), final, and optionally lm_head + MTP."""

    def __init__(self, onnx_dir: str | Path, session_factory=None, manifest: dict | None = None, mtp: bool | None = None):
        """mtp: load the MTP graphs (True: required, None: when the export has them)."""
        self.dir = Path(onnx_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        self.config = self.manifest["config"]
        self.n_layers = self.config["num_hidden_layers"]
        by_name = {g["name"]: g for g in self.manifest["graphs"]}
        needed = ["embed", "final"] + [f"layer_{i:02d}.{m}" for i in range(self.n_layers) for m in ("prefill", "decode")]
        available = all(n in by_name for n in ("mtp.prefill", "mtp.decode", "lm_head"))
        mtp = available if mtp is None else mtp
        if mtp:
            if not available:
                raise InputError(f"{self.dir / 'manifest.json'}: no MTP graphs (mtp.prefill, mtp.decode, lm_head): "
                                 "export a model with an MTP head and --layers all")
            needed += ["mtp.prefill", "mtp.decode", "lm_head"]
        self.has_mtp = mtp
        missing = [g for g in needed if g not in by_name]
        if missing:
            raise InputError(f"{self.dir / 'manifest.json'}: not a full export: graph(s) {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''} missing (export with --layers all)")
        self.records = {n: by_name[n] for n in needed}
        factory = session_factory or onnxrt_factory(self.dir)
        self.sessions = {n: factory(rec) for n, rec in self.records.items()}
        self.layer_records = [self.records[f"layer_{i:02d}.prefill"] for i in range(self.n_layers)]
        self.is_attention = [any(p["role"] == "mask" for p in r["inputs"]) for r in self.layer_records]
        self.mtp_records = [self.records["mtp.prefill"]] if mtp else []

    # -- single graphs ---------------------------------------------------------------------------
    def run(self, name: str, feed: dict) -> dict:
        rec = self.records[name]
        outs = self.sessions[name].run(None, feed)
        return dict(zip([o["name"] for o in rec["outputs"]], outs))

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
        return self._stateful(f"layer_{i:02d}.{mode}", i, {"hidden": hidden}, store, rows, positions, past, T)["hidden_out"]

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
        return self.forward(ids, store, np.arange(B), positions, (0, 0), "prefill")[0]

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
