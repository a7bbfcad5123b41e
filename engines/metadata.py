"""`<graph>.engine.json`: what `build` records beside every engine, and the checks its readers make.

The builder writes it; the runtime, the validator, deploy and `inspect` read it here. An engine is
tied to the export it was built from by the sha256 of its ONNX graph and of its weights file: an
engine whose recorded hashes differ from the manifest beside it (another export, or an export made
again since) is refused, naming both files.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen3next_trt.errors import InputError

METADATA_FORMAT = "qwen3next-trt/engine"
REQUIRED = ("graph", "engine", "onnx_sha256", "weights_sha256", "tensorrt", "inputs", "outputs", "profiles", "layers")


def metadata_path(engine_path: Path) -> Path:
    return engine_path if engine_path.name.endswith(".engine.json") else engine_path.with_name(engine_path.name + ".json")


def read_engine_meta(path: str | Path, need_engine: bool = True) -> dict:
    """An engine's metadata (path: the .engine or its .engine.json); InputError naming the file when it
    or (need_engine) the engine itself is missing, or the metadata is not ours."""
    meta_path = metadata_path(Path(path))
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: engine metadata not found (qwen3next-trt build writes it beside each engine)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{meta_path}: not valid JSON ({type(e).__name__}): expected the metadata `build` writes") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{meta_path}: field 'format': expected {METADATA_FORMAT!r}, got {got!r}")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise InputError(f"{meta_path}: field {missing[0]!r} missing: not complete engine metadata")
    engine = meta_path.with_name(str(meta["engine"]))
    if need_engine and not engine.is_file():
        raise InputError(f"{engine}: missing (named by {meta_path.name})")
    return meta


def check_engine_source(meta: dict, meta_path: Path, manifest, record) -> None:
    """The engine was built from this export's graph `record` (manifest: export.manifest.Manifest)."""
    onnx = manifest.dir / record.file
    weights = manifest.dir / record.weights
    if meta["graph"] != record.name:
        raise InputError(f"{meta_path}: built for graph {meta['graph']!r}, expected {record.name!r}")
    if meta["onnx_sha256"] != record.sha256:
        raise InputError(f"{meta_path}: built from an ONNX graph with sha256 {meta['onnx_sha256'][:12]}..., but {onnx} "
                         f"is {record.sha256[:12]}... (another export, or exported again since): rebuild the engine")
    if meta["weights_sha256"] != manifest.weights[record.weights].sha256:
        raise InputError(f"{meta_path}: built from weights with sha256 {meta['weights_sha256'][:12]}..., but {weights} "
                         f"is {manifest.weights[record.weights].sha256[:12]}... (another export): rebuild the engine")
