"""`qwen3next-trt build`: the exported ONNX graphs -> TensorRT engines, with metadata beside each.

Reads manifest.json only. One engine per weights group (`layer_00`, `mtp`, `embed`, ...): a group's
prefill and decode graphs share one weights file and the same ports, and the prefill graph (symbolic
`seq`) computes the decode case too, so the engine is built from the prefill graph with two
optimization profiles, prefill (profile 0) and decode (profile 1, seq = 1), and holds the weights
once. A group with one graph (embed, final, lm_head, or a selection holding one of the pair) gets one
profile. Every network is strongly typed (precision comes from the graph); profiles come from the
manifest's symbolic dims (batch, seq, past). The custom-op nodes reach the project's plugins through
the ONNX parser. Each engine gets `<group>.engine.json` (engines/metadata.py): the graphs it serves
and their profiles, source hashes, TensorRT flavour and version, plugins and the plugin library,
targets, builder flags, the network's layer list. An engine whose inputs all hash the same as last
time is not rebuilt.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qwen3next_trt.errors import InputError
from qwen3next_trt.outputs import check_output, exclusive

from qwen3next_trt.export.manifest import GraphRecord, Manifest
from qwen3next_trt.progress import Eta

from . import trt as trt_adapter
from .metadata import METADATA_FORMAT, METADATA_VERSION, engine_file_name, engine_group, is_current, read_engine_meta

TIMING_CACHE = "timing.cache"
# written first into every engines folder: a later build (or --force rebuild) may write into a folder
# that has it, even one interrupted before its first engine; any other non-empty folder is refused
MARKER = ".qwen3next-engines"


def is_engines_dir(path: Path) -> bool:
    """An engines folder this tool wrote: its marker, or (folders built before the marker) engine metadata."""
    if (path / MARKER).is_file():
        return True
    for meta in path.glob("*.engine.json"):
        try:
            if json.loads(meta.read_text()).get("format") == METADATA_FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


@dataclass
class Limits:
    max_batch: int = 4
    max_seq: int = 256
    max_context: int = 4096

    def ranges(self, dim: str, mode: str) -> tuple[int, int, int]:
        if "+" in dim:  # "past + seq", "past + 1": the sum of the parts' ranges
            parts = [s.strip() for s in dim.split("+")]
            rs = [(int(p),) * 3 if p.isdigit() else self.ranges(p, mode) for p in parts]
            return tuple(sum(r[i] for r in rs) for i in range(3))
        if dim == "batch":
            return 1, max(1, self.max_batch // 2), self.max_batch
        if dim == "seq":
            return (1, 1, 1) if mode == "decode" else (1, min(self.max_seq, 128), self.max_seq)
        if dim == "past":
            return 0, min(self.max_context // 2, 1024), self.max_context - 1
        raise InputError(f"unknown symbolic dim {dim!r} in the manifest")


@dataclass
class EngineUnit:
    """One engine: a weights group and the selected graphs it serves, graph i through profile i.
    It is compiled from the first (the prefill graph of a pair)."""

    group: str
    graphs: list[GraphRecord]

    @property
    def built_from(self) -> GraphRecord:
        return self.graphs[0]

    @property
    def weights(self) -> str:
        return self.built_from.weights

    @property
    def engine(self) -> str:
        return engine_file_name(self.group)


def engine_units(graphs: list[GraphRecord], manifest_path="manifest.json") -> list[EngineUnit]:
    """The selected graphs by weights group, in export order: a prefill + decode pair -> one unit
    (prefill first); a lone graph -> its own unit. InputError for any other sharing of a weights file."""
    by_group: dict[str, list[GraphRecord]] = {}
    for g in graphs:
        by_group.setdefault(engine_group(g), []).append(g)
    units = []
    for group, records in by_group.items():
        modes = sorted(r.mode for r in records)
        if len(records) == 2 and modes == ["decode", "prefill"]:
            records = sorted(records, key=lambda r: r.mode != "prefill")
        elif len(records) != 1:
            raise InputError(f"{manifest_path}: graphs {', '.join(r.name for r in records)} share the weights file "
                             f"{records[0].weights} but are not one prefill + one decode graph: one engine cannot serve them")
        units.append(EngineUnit(group, records))
    return units


class CaptureLogger:
    def __init__(self, trt):
        class _Logger(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)
                inner.messages = []

            def log(inner, severity, msg):
                inner.messages.append((severity, msg))

        self.logger = _Logger()
        self.trt = trt

    def errors(self) -> list[str]:
        return [m for s, m in self.logger.messages if s <= self.trt.ILogger.Severity.ERROR]


def describe_layer(trt, layer) -> dict:
    entry = {"name": layer.name, "type": str(layer.type).split(".")[-1]}
    if layer.type == trt.LayerType.PLUGIN_V3:
        inputs = [layer.get_input(i) for i in range(layer.num_inputs)]
        layer.__class__ = trt.IPluginV3Layer
        # a C++ plugin reaches Python as a bare IPluginV3: its name is on the core capability
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        entry["plugin"] = getattr(core, "plugin_name", None) or getattr(layer.plugin, "plugin_name", "?")
        # what feeds a plugin (a float8 weight, or a DEQUANTIZE's output) is what decides its kernel
        entry["inputs"] = [{"name": t.name, "dtype": str(t.dtype).split(".")[-1]} if t is not None else None
                           for t in inputs]
    return entry


def allow_decomposed_attention(trt, network) -> int:
    """Mark float32 attention decomposable: TensorRT's fused attention kernels take only 16-bit
    inputs, and a float32 IAttention without this flag fails to build. Returns how many it marked."""
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.ATTENTION_OUTPUT:
            continue
        layer.__class__ = trt.IAttentionOutputLayer  # the Python API's way to reach a layer's own class
        attention = layer.attention
        if attention.get_input(0).dtype == trt.DataType.FLOAT:
            attention.decomposable = True
            marked += 1
    return marked


class EngineBuilder:
    def __init__(self, onnx_dir, out_dir, graphs: str | None = None, limits: Limits | None = None,
                 optimization_level: int = 3, flavour: str = "auto", compute_capabilities: list[str] | None = None,
                 force: bool = False, progress=print, embed_plugins: bool = False):
        self.onnx_dir, self.out_dir = Path(onnx_dir), Path(out_dir)
        self.manifest = Manifest.load(self.onnx_dir)
        check_output(self.out_dir, "--out", {"export (--onnx)": self.onnx_dir}, is_engines_dir,
                     "an engines folder written by `qwen3next-trt build`", f"{MARKER} or *.engine.json metadata")
        self.graphs = self.manifest.select(None if graphs == "all" else graphs)
        self.limits = limits or Limits()
        if self.limits.max_context > self.manifest.max_positions:
            raise InputError(f"--max-context {self.limits.max_context}: the export's RoPE table holds {self.manifest.max_positions} positions")
        if not 0 <= optimization_level <= 5:
            raise InputError(f"--opt-level {optimization_level}: expected 0..5")
        self.units = engine_units(self.graphs, self.manifest.path)
        for unit in self.units:
            self._check_pair(unit)
        self.optimization_level, self.force, self.progress = optimization_level, force, progress
        self.T = trt_adapter.load(flavour)
        fp8 = self.manifest.precision.weights.fp8
        if self.T.flavour == "tensorrt_rtx" and self.manifest.precision.activations.dynamic:
            # measured 2026-11-29 with 1.7.1.116: every layer graph fails in Myelin (CHECK(is_constant()))
            # where a run-time activation scale meets an FP8 weight; a lone Q/DQ -> MatMul does build
            raise InputError(f"{self.manifest.path}: activation_precision: dynamic per-token FP8 scales, which "
                             f"TensorRT-RTX {self.T.version} cannot compile into FP8 GEMMs (its Myelin compiler wants constant "
                             "Q/DQ scales); export with --activations fp8 (static, calibrated) for TensorRT-RTX engines")
        if self.T.ahead_of_time and compute_capabilities is None:
            # FP8 needs FP8 tensor cores: Ada (SM89) and newer; Ampere cannot run such an engine
            compute_capabilities = ["SM89", "SM120"] if fp8 else ["SM80", "SM89", "SM120"]
        if fp8 and "SM80" in (compute_capabilities or []) or fp8 and "SM86" in (compute_capabilities or []):
            raise InputError(f"--compute-capability {','.join(compute_capabilities)}: this export has FP8 weights, "
                             "which SM80/SM86 (Ampere) cannot run; use SM89 or newer")
        self.ccs = self.T.compute_capabilities(compute_capabilities)
        self.cc_names = compute_capabilities or []
        from qwen3next_trt.plugins import build as plugin_build

        # The C++ plugin library (not the Python plugins: one process cannot register both, and only the
        # library serves C++ hosts such as Triton); compiled on first use, like the kernels.
        try:
            self.plugin_library = plugin_build.cpp_library_info(progress=progress)
        except plugin_build.PluginBuildError as e:
            raise InputError(str(e)) from None
        self.plugins = list(plugin_build.CPP_PLUGINS)
        self.embed_plugins = embed_plugins
        self.plugin_source_hash = self.plugin_library["source_sha256"]

    # -- one engine ------------------------------------------------------------------------------
    def _ranges(self, port, mode: str) -> list[tuple[int, int, int]]:
        return [(d, d, d) if isinstance(d, int) else self.limits.ranges(d, mode) for d in port.shape]

    def _profile(self, record: GraphRecord, mode: str) -> dict[str, dict[str, list[int]]]:
        """The shape ranges of `record`'s dynamic inputs when it runs as `mode` (decode: seq = 1)."""
        profile = {}
        for p in record.inputs:
            if not p.dynamic:
                continue
            lo, opt, hi = zip(*self._ranges(p, mode))
            profile[p.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        return profile

    def _check_pair(self, unit: EngineUnit):
        """The decode graph is the prefill graph at seq = 1: same ports, same dtypes, same shape ranges
        (what makes the prefill engine's decode profile a faithful stand-in for it)."""
        if len(unit.graphs) != 2:
            return
        prefill, decode = unit.graphs
        for kind, a, b in (("input", prefill.inputs, decode.inputs), ("output", prefill.outputs, decode.outputs)):
            if [(p.name, p.dtype) for p in a] != [(p.name, p.dtype) for p in b]:
                raise InputError(f"{self.manifest.path}: graphs {prefill.name} and {decode.name} share {unit.weights} but their "
                                 f"{kind}s differ ({[(p.name, p.dtype) for p in a]} vs {[(p.name, p.dtype) for p in b]}): "
                                 "one engine cannot serve both")
            for p, q in zip(a, b):
                if self._ranges(p, "decode") != self._ranges(q, "decode"):
                    raise InputError(f"{self.manifest.path}: {kind} {p.name!r} of {decode.name} has shape {q.shape}, which is not "
                                     f"{prefill.name}'s {p.shape} at seq = 1: one engine cannot serve both")

    def profiles(self, unit: EngineUnit) -> list[dict]:
        """One profile per served graph, in order, all over the tensors of the graph built from."""
        return [self._profile(unit.built_from, g.mode) for g in unit.graphs]

    def _key(self, unit: EngineUnit, profiles: list[dict], weights_sha: str) -> str:
        from . import fold

        # the parser reads onnx_for_parser's output, not the file: a change to the fold rebuilds
        fold_sha = hashlib.sha256(Path(fold.__file__).read_bytes()).hexdigest()
        served = [f"{g.name}={g.sha256}" for g in unit.graphs]
        parts = [unit.built_from.sha256, weights_sha, ",".join(served), fold_sha, self.T.flavour, self.T.version,
                 self.plugin_library["sha256"], json.dumps(profiles, sort_keys=True),
                 ",".join(self.cc_names), str(self.optimization_level), f"embed={self.embed_plugins}"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def build_one(self, unit: EngineUnit, timing_cache) -> tuple[dict, bool]:
        from .fold import onnx_for_parser

        trt = self.T.trt
        record = unit.built_from
        onnx_path = self.onnx_dir / record.file
        engine_path = self.out_dir / unit.engine
        meta_path = engine_path.with_name(engine_path.name + ".json")
        profiles = self.profiles(unit)
        # the files were verified against these hashes before the build (Manifest.verify)
        weights_sha = self.manifest.weights[unit.weights].sha256
        key = self._key(unit, profiles, weights_sha)
        if not self.force and engine_path.exists() and meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = {}  # unreadable metadata: rebuild
            if is_current(old) and old.get("cache_key") == key:
                return old, False

        log = CaptureLogger(trt)
        builder = trt.Builder(log.logger)
        # each Builder has its own plugin registry (it also searches the process-wide one)
        trt_adapter.load_plugin_library(self.T, builder.get_plugin_registry(), self.plugin_library["path"], tuple(self.plugins))
        network = self.T.create_network(builder)
        parser = trt.OnnxParser(network, log.logger)
        refused_before = trt_adapter.plugin_library_last_error(self.plugin_library["path"])
        model_bytes, rewrites = onnx_for_parser(onnx_path)
        # the path tells the parser where the external weights are
        if not parser.parse(model_bytes, str(onnx_path)):
            errs = []
            for i in range(parser.num_errors):
                e = parser.get_error(i)
                errs.append(f"node {e.node_name()!r} ({e.node_operator()}): {e.desc()}")
            # a plugin's refusal of an attribute reaches neither the parser's errors nor (TensorRT-RTX) the logger
            refused = trt_adapter.plugin_library_last_error(self.plugin_library["path"])
            errs += [refused] if refused and refused != refused_before else []
            raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errs or log.errors()[-3:]))
        layers = [describe_layer(trt, network.get_layer(i)) for i in range(network.num_layers)]
        decomposed = allow_decomposed_attention(trt, network)
        config = builder.create_builder_config()
        config.builder_optimization_level = self.optimization_level
        if self.ccs:
            config.num_compute_capabilities = len(self.ccs)
            for i, cc in enumerate(self.ccs):
                config.set_compute_capability(cc, i)
        if any(profiles):
            # added in order: profile i serves unit.graphs[i] (the metadata's `graphs` says so)
            for profile in profiles:
                prof = builder.create_optimization_profile()
                for name, r in profile.items():
                    prof.set_shape(name, r["min"], r["opt"], r["max"])
                config.add_optimization_profile(prof)
        if timing_cache is not None:
            config.set_timing_cache(timing_cache, False)
        if self.embed_plugins:
            # the plan carries the library (+ its size): a host deserialises it without loading plugins first
            config.plugins_to_serialize = [self.plugin_library["path"]]
        t0 = time.time()
        plan = builder.build_serialized_network(network, config)
        seconds = time.time() - t0
        if plan is None:
            raise InputError(f"{onnx_path}: engine build failed: " + " | ".join(log.errors()[-3:] or ["(no message)"]))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(plan)
            os.replace(tmp, engine_path)
        except BaseException:  # an interrupt or a full disk mid-write: no half engine left behind
            tmp.unlink(missing_ok=True)
            raise
        plugin_layers = sorted(lay["plugin"] for lay in layers if "plugin" in lay)
        meta = {
            "format": METADATA_FORMAT, "version": METADATA_VERSION,
            "group": unit.group, "kind": record.kind.value, "layer": record.layer,
            "graphs": {g.name: i for i, g in enumerate(unit.graphs)},
            "built_from": record.name, "graph_sha256": {g.name: g.sha256 for g in unit.graphs},
            "engine": engine_path.name, "engine_bytes": engine_path.stat().st_size,
            "onnx": str(onnx_path), "onnx_sha256": record.sha256,
            "weights": unit.weights, "weights_sha256": weights_sha, "weights_bytes": self.manifest.weights[unit.weights].bytes,
            "tensorrt": {"flavour": self.T.flavour, "version": self.T.version},
            "profiles": profiles, "inputs": [p.to_json() for p in record.inputs], "outputs": [p.to_json() for p in record.outputs],
            "plugins": [{"name": n, "version": "1", "namespace": ""} for n in self.plugins],
            "plugin_layers": plugin_layers,
            "plugin_library_source_sha256": self.plugin_source_hash,
            "plugin_library": {"path": self.plugin_library["path"], "sha256": self.plugin_library["sha256"],
                               "tensorrt_headers": self.plugin_library["tensorrt_headers_version"],
                               "embedded": self.embed_plugins},
            "rewrites": rewrites,
            "compute_capabilities": self.cc_names or ["the building GPU"],
            "builder": {"strongly_typed": True, "optimization_level": self.optimization_level,
                        "float32_attention_decomposed": decomposed,
                        "timing_cache": TIMING_CACHE if timing_cache is not None else None},
            "built_on": f"{platform.node()} ({'CPU, ahead of time' if self.T.ahead_of_time else 'GPU'})",
            "build_seconds": round(seconds, 2),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "layers": layers,
            "cache_key": key,
        }
        tmp = meta_path.with_name(f".{meta_path.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
        return meta, True

    def remove_old_layout(self, unit: EngineUnit) -> list[str]:
        """Engines of the layout before one engine per group (`layer_00.prefill.engine`, ...) for the
        graphs `unit` now serves: they would hold the weights a second time and readers refuse them.
        Only files whose metadata says so are removed."""
        removed = []
        for g in unit.graphs:
            engine = self.out_dir / engine_file_name(g.name)
            meta = engine.with_name(engine.name + ".json")
            if g.name == unit.group or not meta.is_file():
                continue
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(old, dict) and old.get("format") == METADATA_FORMAT and not is_current(old):
                engine.unlink(missing_ok=True)
                meta.unlink()
                removed.append(engine.name)
        return removed

    def weights_bytes(self, unit: EngineUnit) -> int:
        """Bytes of a group's weights file (what its engine will hold), as the manifest records them."""
        return self.manifest.weights[unit.weights].bytes

    def check_disk(self):
        """An engine holds its group's weights once, whatever the number of profiles: at 80B layer 0 (FP8
        weights, bf16) one engine per graph was 1603.6 MiB for a 1600.9 MiB weights file (NOTES.md). So
        every group without an engine yet needs about its weights file again, plus the largest once more
        for the temporary file an engine is written to."""
        sizes = {g.weights: self.manifest.weights[g.weights].bytes for g in self.graphs}  # one entry per group
        missing = [b for w, b in sizes.items() if not (self.out_dir / engine_file_name(w.removesuffix(".weights"))).exists()]
        need = int((sum(missing) + max(sizes.values(), default=0)) * 1.05) + (64 << 20)
        probe = self.out_dir if self.out_dir.exists() else self.out_dir.resolve().parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need:
            raise InputError(f"--out {self.out_dir}: building {len(missing)} engine(s) needs about {need / 2**30:.1f} GiB of disk "
                             f"(an engine holds its group's weights) and {probe} has {free / 2**30:.1f} GiB free: "
                             "free space, or give --out on a disk with that much free")

    def run(self) -> list[dict]:
        self.manifest.verify(self.graphs, self.progress)
        self.check_disk()
        self.out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.out_dir.resolve(), "--out"):
            self.out_dir.mkdir(exist_ok=True)
            (self.out_dir / MARKER).write_text(json.dumps({"format": "qwen3next-trt/engines", "onnx": str(self.onnx_dir.resolve())}))
            return self._run()

    def _run(self) -> list[dict]:
        trt = self.T.trt
        cache_path = self.out_dir / TIMING_CACHE
        config = trt.Builder(CaptureLogger(trt).logger).create_builder_config()
        timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        targets = ", ".join(self.cc_names) if self.cc_names else "this GPU"
        where = "CPU, ahead of time" if self.T.ahead_of_time else "GPU"
        self.progress(f"[build] {len(self.units)} engines for {len(self.graphs)} graphs (one per weights group) with "
                      f"{self.T.flavour} {self.T.version} on {where} for {targets}; plugins {', '.join(self.plugins)}")
        precision = self.manifest.precision
        if precision.weights.fp8:
            # what an FP8 export becomes (engines/fold.py; NOTES.md "FP8 x FP8 projections")
            gemms = ("FP8 x FP8 GEMMs (static activation scales; weights with several 128-column blocks split along K)"
                     if precision.activations.fp8 else
                     "weight-only FP8: DequantizeLinear -> float GEMM (export with --activations fp8 for FP8 x FP8 GEMMs)")
            self.progress(f"[build] FP8 export: routed experts go to the MoE plugin as FP8 bytes + 128x128 block scales "
                          f"(what is not folded, and why: the metadata's rewrites); projections: {gemms}")
        results = []
        # ETA by weight bytes: a layer of the 80B model takes minutes, a norm seconds
        sizes = [self.weights_bytes(u) for u in self.units]
        eta = Eta(sum(sizes))
        for i, unit in enumerate(self.units, 1):
            t0 = time.time()
            meta, built = self.build_one(unit, timing_cache)
            removed = self.remove_old_layout(unit)
            results.append(meta)
            status = "built" if built else "up to date"
            if built:
                progress = eta.step(sizes[i - 1], time.time() - t0)
            else:
                eta.skip(sizes[i - 1])
                progress = ""
            names = meta["plugin_layers"]
            plugins = ", ".join(f"{n}" + (f" x{names.count(n)}" if names.count(n) > 1 else "") for n in sorted(set(names))) or "-"
            served = "+".join(g.mode for g in unit.graphs)
            self.progress(f"[build] {i}/{len(self.units)} {unit.engine:<16} {served:<14} {status:<10} {len(meta['layers']):>4} layers  "
                          f"{meta['engine_bytes'] / 2**20:8.1f} MiB ({meta['engine_bytes'] / max(1, sizes[i - 1]):.2f} x weights)  "
                          f"{time.time() - t0:6.1f} s  plugins: {plugins}" + (f"  {progress}" if progress else "")
                          + (f"  (replaced {', '.join(removed)})" if removed else ""))
        serialized = timing_cache.serialize()
        tmp = cache_path.with_name(f".{TIMING_CACHE}.tmp")
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, cache_path)
        return results


def describe_profiles(meta: dict) -> list[str]:
    """Per profile: which graph it serves, then each dynamic input's min / opt / max."""
    serves = {i: g for g, i in meta["graphs"].items()}
    lines = []
    for i, profile in enumerate(meta["profiles"]):
        lines.append(f"profile {i}: serves {serves.get(i, '(no graph)')}" + ("" if profile else " (no dynamic inputs)"))
        lines += [f"  {name:<28} min {r['min']}  opt {r['opt']}  max {r['max']}" for name, r in profile.items()]
    return lines


def inspect_path(path: str | Path) -> str:
    """Metadata and layer list of one engine, or a table of every engine in a directory."""
    path = Path(path)
    if path.is_dir():
        metas = [read_engine_meta(p) for p in sorted(path.glob("*.engine.json"))]
        if not metas:
            raise InputError(f"{path}: no *.engine.json files (not an engines directory)")
    else:
        metas = [read_engine_meta(path)]
    lines = []
    if len(metas) > 1:
        graphs = [", ".join(f"{g} ({i})" for g, i in m["graphs"].items()) for m in metas]
        width = max(len("graphs (profile)"), *map(len, graphs)) + 2
        lines.append(f"{'engine':<18}{'graphs (profile)':<{width}}{'layers':>6}{'MiB':>9}{'x weights':>10}  {'TensorRT':<24}"
                     "targets; plugin layers")
        for m, served in zip(metas, graphs):
            ratio = m["engine_bytes"] / m["weights_bytes"] if m.get("weights_bytes") else float("nan")
            names = m["plugin_layers"]
            plugins = ",".join(n + (f" x{names.count(n)}" if names.count(n) > 1 else "") for n in sorted(set(names))) or "-"
            lines.append(f"{m['engine']:<18}{served:<{width}}{len(m['layers']):>6}{m['engine_bytes'] / 2**20:>9.1f}{ratio:>10.2f}  "
                         f"{m['tensorrt']['flavour'] + ' ' + m['tensorrt']['version']:<24}"
                         f"{','.join(m['compute_capabilities'])}; {plugins}")
        return "\n".join(lines)
    m = metas[0]
    lines += [f"engine: {m['engine']} ({m['engine_bytes']:,} bytes; weights file {m.get('weights', '?')} {m.get('weights_bytes', 0):,} bytes), "
              f"group {m['group']} ({m['kind']}), built from graph {m['built_from']}",
              "serves: " + ", ".join(f"{g} with profile {i}" for g, i in m["graphs"].items()),
              f"TensorRT: {m['tensorrt']['flavour']} {m['tensorrt']['version']}; targets {', '.join(m['compute_capabilities'])}; "
              f"built on {m['built_on']} in {m['build_seconds']} s ({m['created']})",
              f"builder: {m['builder']}",
              f"plugins: {', '.join(p['name'] for p in m['plugins'])}; plugin library source sha256 {m['plugin_library_source_sha256'][:16]}",
              *([f"plugin library: {lib['path']} (sha256 {lib['sha256'][:16]}, TensorRT {lib['tensorrt_headers']} headers, "
                 f"{'embedded in the plan' if lib['embedded'] else 'not embedded: load it before deserialising'})"]
                if (lib := m.get("plugin_library")) else []),
              f"parser input rewrites: {json.dumps(m.get('rewrites'))}",
              f"source: {m['onnx']} (sha256 {m['onnx_sha256'][:16]}), weights sha256 {m['weights_sha256'][:16]}",
              *describe_profiles(m)]
    lines.append(f"layers ({len(m['layers'])}):")
    lines += [f"  {i:>4}  {lay['type']:<22} {lay['name']}" + (f"  -> plugin {lay['plugin']}" if "plugin" in lay else "")
              + (" (" + ", ".join(f"{t['name']}: {t['dtype']}" if t else "-" for t in lay["inputs"]) + ")" if lay.get("inputs") else "")
              for i, lay in enumerate(m["layers"])]
    return "\n".join(lines)
