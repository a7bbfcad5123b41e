"""`<group>.engine.json`: what `build` records beside every engine, and the checks its readers make.

The builder writes it; the runtime, the validator, deploy and `inspect` read it here. One engine per
weights group of the manifest (`layer_00`, `mtp`, `embed`, ...): a group's prefill and decode graphs
share one weights file and the same ports, so one engine, built from the prefill graph, serves both
through two optimization profiles; `graphs` maps each graph it serves to its profile index, e.g.
`{"layer_00.prefill": 0, "layer_00.decode": 1}`. An engine is tied to the export it was built from by
the sha256 of the graph it was compiled from, of every graph it serves and of the weights file: an
engine whose recorded hashes differ from the manifest beside it (another export, or an export made
again since) is refused, naming both files.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen3next_trt.errors import InputError

METADATA_FORMAT = "qwen3next-trt/engine"
# 2: one engine per weights group, a profile per graph it serves (1, unversioned: one engine per graph)
METADATA_VERSION = 2
REQUIRED = ("group", "engine", "graphs", "built_from", "graph_sha256", "onnx_sha256", "weights_sha256", "tensorrt",
            "inputs", "outputs", "profiles", "layers")
ENGINE_SUFFIX = ".engine"


def engine_group(record) -> str:
    """The engine a graph record is served by, named after its weights group (`layer_00.weights` -> `layer_00`)."""
    return record.weights.removesuffix(".weights")


def engine_file_name(group: str) -> str:
    return group + ENGINE_SUFFIX


def metadata_path(engine_path: Path) -> Path:
    return engine_path if engine_path.name.endswith(".engine.json") else engine_path.with_name(engine_path.name + ".json")


def is_current(meta) -> bool:
    """Metadata of this layout (an older layout's engines are to be rebuilt, not read)."""
    return isinstance(meta, dict) and meta.get("format") == METADATA_FORMAT and meta.get("version") == METADATA_VERSION


def read_engine_meta(path: str | Path, need_engine: bool = True) -> dict:
    """An engine's metadata (path: the .engine or its .engine.json); InputError naming the file when it
    or (need_engine) the engine itself is missing, or the metadata is not ours or of an older layout."""
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
    if meta.get("version") != METADATA_VERSION:
        raise InputError(f"{meta_path}: engine metadata version {meta.get('version', 1)!r}, this qwen3next-trt reads version "
                         f"{METADATA_VERSION} (one engine per weights group, serving its prefill and decode graphs through "
                         "two optimization profiles): rebuild the engines with `qwen3next-trt build`")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise InputError(f"{meta_path}: field {missing[0]!r} missing: not complete engine metadata")
    graphs, profiles = meta["graphs"], meta["profiles"]
    if (not isinstance(graphs, dict) or not graphs or not isinstance(profiles, list)
            or any(not isinstance(i, int) or not 0 <= i < max(1, len(profiles)) for i in graphs.values())):
        raise InputError(f"{meta_path}: field 'graphs': expected {{graph name: profile index < {len(profiles)}}}, got {graphs!r}")
    engine = meta_path.with_name(str(meta["engine"]))
    if need_engine and not engine.is_file():
        raise InputError(f"{engine}: missing (named by {meta_path.name})")
    return meta


def profile_of(meta: dict, meta_path: Path, graph: str) -> int:
    """The optimization profile that serves `graph`; InputError when the engine does not serve it."""
    if graph not in meta["graphs"]:
        raise InputError(f"{meta_path}: engine of group {meta['group']!r} serves {', '.join(meta['graphs'])}, not graph {graph!r}: "
                         f"build it with `qwen3next-trt build --graphs {meta['group']}`")
    return meta["graphs"][graph]


def check_engine_source(meta: dict, meta_path: Path, manifest, record) -> int:
    """The engine serves the graph `record` of this export (manifest: export.manifest.Manifest), and was
    built from this export's graph and weights. Returns the profile index that serves `record`."""
    profile = profile_of(meta, meta_path, record.name)
    weights = manifest.dir / record.weights
    # the graph it was compiled from (the group's prefill graph) and the graph it serves, both this export's
    sources = [record] + ([manifest.graph(meta["built_from"])] if meta["built_from"] != record.name else [])
    for rec in sources:
        recorded = meta["onnx_sha256"] if rec.name == meta["built_from"] else meta["graph_sha256"].get(rec.name, "")
        if recorded != rec.sha256:
            raise InputError(f"{meta_path}: built from an ONNX graph with sha256 {recorded[:12]}..., but {manifest.dir / rec.file} "
                             f"is {rec.sha256[:12]}... (another export, or exported again since): rebuild the engine")
    if meta["weights_sha256"] != manifest.weights[record.weights].sha256:
        raise InputError(f"{meta_path}: built from weights with sha256 {meta['weights_sha256'][:12]}..., but {weights} "
                         f"is {manifest.weights[record.weights].sha256[:12]}... (another export): rebuild the engine")
    return profile


def plugin_library_path(meta: dict, meta_path: Path) -> Path | None:
    """The C++ plugin library to load before deserialising the engine: None when the plan embeds it;
    else the library recorded at build time, or this host's build of it, whichever has the
    recorded sha256. A plan names its plugins only, so another library build could hold other
    kernels or fields under the same names: a missing or different library is an error, not a guess."""
    from qwen3next_trt.plugins.build import built_cpp_library

    lib = meta.get("plugin_library")
    if lib and lib.get("embedded"):
        return None
    current = built_cpp_library()
    if not lib:  # metadata that records none (hand-made): this host's library, if any
        return current if current is not None and current.is_file() else None
    from qwen3next_trt.hashing import verified_sha256

    want = lib.get("sha256")
    recorded = Path(lib["path"]) if lib.get("path") else None
    seen = []
    for path in dict.fromkeys(p for p in (recorded, current) if p is not None):
        if path.is_file():
            sha = verified_sha256(path)[0]
            if want is None or sha == want:
                return path
            seen.append(f"{path} has sha256 {sha[:16]}...")
    need = f"the plugin library it was built with ({recorded or 'path not recorded'}, sha256 {str(want)[:16]}...)"
    if not seen:
        raise InputError(f"{meta_path}: {need} is missing: rebuild the engines (`qwen3next-trt build`), or build them "
                         "with --embed-plugins so the plan carries it")
    raise InputError(f"{meta_path}: {need} is not there: {'; '.join(seen)}; rebuild the engines with this library "
                     "(`qwen3next-trt build --force`)")
