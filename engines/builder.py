"""`qwen3next-trt build`: the exported ONNX graphs -> TensorRT engines, with metadata beside each.

Reads manifest.json only. Every graph becomes a strongly typed network (precision comes from the
graph); its optimization profile comes from the manifest's symbolic dims (batch, seq, past). The
custom-op nodes reach the project's plugins through the ONNX parser. Each engine gets
`<graph>.engine.json`: source hashes, TensorRT flavour and version, profiles, plugins and the plugin
library's source hash, targets, builder flags, the network's layer list. A graph whose inputs all
hash the same as last time is not rebuilt.
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
from .metadata import METADATA_FORMAT, read_engine_meta

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

    # -- one graph -------------------------------------------------------------------------------
    def _profile(self, record: GraphRecord) -> dict[str, dict[str, list[int]]]:
        profile = {}
        for p in record.inputs:
            if not p.dynamic:
                continue
            lo, opt, hi = [], [], []
            for d in p.shape:
                r = (d, d, d) if isinstance(d, int) else self.limits.ranges(d, record.mode)
                lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
            profile[p.name] = {"min": lo, "opt": opt, "max": hi}
        return profile

    def _key(self, record: GraphRecord, profile: dict, weights_sha: str, onnx_sha: str) -> str:
        parts = [onnx_sha, weights_sha, self.T.flavour, self.T.version, self.plugin_library["sha256"], json.dumps(profile, sort_keys=True),
                 ",".join(self.cc_names), str(self.optimization_level), f"embed={self.embed_plugins}"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def build_one(self, record: GraphRecord, timing_cache) -> tuple[dict, bool]:
        trt = self.T.trt
        onnx_path = self.onnx_dir / record.file
        engine_path = self.out_dir / f"{record.name}.engine"
        meta_path = engine_path.with_name(engine_path.name + ".json")
        profile = self._profile(record)
        # the files were verified against these hashes before the build (Manifest.verify)
        onnx_sha, weights_sha = record.sha256, self.manifest.weights[record.weights].sha256
        key = self._key(record, profile, weights_sha, onnx_sha)
        if not self.force and engine_path.exists() and meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = {}  # unreadable metadata: rebuild
            if isinstance(old, dict) and old.get("cache_key") == key:
                return old, False

        log = CaptureLogger(trt)
        builder = trt.Builder(log.logger)
        # each Builder has its own plugin registry (it also searches the process-wide one)
        trt_adapter.load_plugin_library(self.T, builder.get_plugin_registry(), self.plugin_library["path"], tuple(self.plugins))
        network = self.T.create_network(builder)
        parser = trt.OnnxParser(network, log.logger)
        refused_before = trt_adapter.plugin_library_last_error(self.plugin_library["path"])
        if not parser.parse_from_file(str(onnx_path)):
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
        if profile:
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
            "format": METADATA_FORMAT,
            "graph": record.name, "kind": record.kind.value, "mode": record.mode, "layer": record.layer,
            "engine": engine_path.name, "engine_bytes": engine_path.stat().st_size,
            "onnx": str(onnx_path), "onnx_sha256": onnx_sha, "weights_sha256": weights_sha,
            "tensorrt": {"flavour": self.T.flavour, "version": self.T.version},
            "profiles": [profile], "inputs": [p.to_json() for p in record.inputs], "outputs": [p.to_json() for p in record.outputs],
            "plugins": [{"name": n, "version": "1", "namespace": ""} for n in self.plugins],
            "plugin_layers": plugin_layers,
            "plugin_library_source_sha256": self.plugin_source_hash,
            "plugin_library": {"path": self.plugin_library["path"], "sha256": self.plugin_library["sha256"],
                               "tensorrt_headers": self.plugin_library["tensorrt_headers_version"],
                               "embedded": self.embed_plugins},
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

    def weights_bytes(self, record: GraphRecord) -> int:
        """Bytes of a graph's weights file (what its engine will hold), as the manifest records them."""
        return self.manifest.weights[record.weights].bytes

    def check_disk(self):
        """An engine holds its graph's weights: at 80B layer 0 (FP8 weights, bf16) the prefill and the
        decode engine are 1603.6 and 1603.8 MiB for a 1600.9 MiB weights file (NOTES.md). So every graph
        without an engine yet needs about its weights file again, plus the largest once more for the
        temporary file an engine is written to."""
        sizes = [self.weights_bytes(g) for g in self.graphs]
        missing = [b for g, b in zip(self.graphs, sizes) if not (self.out_dir / f"{g.name}.engine").exists()]
        need = int((sum(missing) + max(sizes, default=0)) * 1.05) + (64 << 20)
        probe = self.out_dir if self.out_dir.exists() else self.out_dir.resolve().parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need:
            raise InputError(f"--out {self.out_dir}: building {len(missing)} engine(s) needs about {need / 2**30:.1f} GiB of disk "
                             f"(an engine holds its graph's weights) and {probe} has {free / 2**30:.1f} GiB free: "
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
        self.progress(f"[build] {len(self.graphs)} graphs with {self.T.flavour} {self.T.version} on {where} for {targets}; "
                      f"plugins {', '.join(self.plugins)}")
        results = []
        # ETA by weight bytes: a layer graph of the 80B model takes minutes, a norm graph seconds
        sizes = [self.weights_bytes(g) for g in self.graphs]
        eta = Eta(sum(sizes))
        for i, record in enumerate(self.graphs, 1):
            t0 = time.time()
            meta, built = self.build_one(record, timing_cache)
            results.append(meta)
            status = "built" if built else "up to date"
            if built:
                progress = eta.step(sizes[i - 1], time.time() - t0)
            else:
                eta.skip(sizes[i - 1])
                progress = ""
            names = meta["plugin_layers"]
            plugins = ", ".join(f"{n}" + (f" x{names.count(n)}" if names.count(n) > 1 else "") for n in sorted(set(names))) or "-"
            self.progress(f"[build] {i}/{len(self.graphs)} {record.name:<18} {status:<10} {len(meta['layers']):>4} layers  "
                          f"{meta['engine_bytes'] / 2**20:8.1f} MiB  {time.time() - t0:6.1f} s  plugins: {plugins}"
                          + (f"  {progress}" if progress else ""))
        serialized = timing_cache.serialize()
        tmp = cache_path.with_name(f".{TIMING_CACHE}.tmp")
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, cache_path)
        return results


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
        lines.append(f"{'engine':<22}{'layers':>7}{'MiB':>9}  {'TensorRT':<24}targets; plugin layers")
        for m in metas:
            lines.append(f"{m['graph']:<22}{len(m['layers']):>7}{m['engine_bytes'] / 2**20:>9.1f}  "
                         f"{m['tensorrt']['flavour'] + ' ' + m['tensorrt']['version']:<24}"
                         f"{','.join(m['compute_capabilities'])}; {','.join(m['plugin_layers']) or '-'}")
        return "\n".join(lines)
    m = metas[0]
    lines += [f"engine: {m['engine']} ({m['engine_bytes']:,} bytes), graph {m['graph']} ({m['kind']}, {m['mode']})",
              f"TensorRT: {m['tensorrt']['flavour']} {m['tensorrt']['version']}; targets {', '.join(m['compute_capabilities'])}; "
              f"built on {m['built_on']} in {m['build_seconds']} s ({m['created']})",
              f"builder: {m['builder']}",
              f"plugins: {', '.join(p['name'] for p in m['plugins'])}; plugin library source sha256 {m['plugin_library_source_sha256'][:16]}",
              *([f"plugin library: {lib['path']} (sha256 {lib['sha256'][:16]}, TensorRT {lib['tensorrt_headers']} headers, "
                 f"{'embedded in the plan' if lib['embedded'] else 'not embedded: load it before deserialising'})"]
                if (lib := m.get("plugin_library")) else []),
              f"source: {m['onnx']} (sha256 {m['onnx_sha256'][:16]}), weights sha256 {m['weights_sha256'][:16]}",
              "profile:"]
    for name, r in m["profiles"][0].items():
        lines.append(f"  {name:<28} min {r['min']}  opt {r['opt']}  max {r['max']}")
    lines.append(f"layers ({len(m['layers'])}):")
    lines += [f"  {i:>4}  {lay['type']:<22} {lay['name']}" + (f"  -> plugin {lay['plugin']}" if "plugin" in lay else "")
              + (" (" + ", ".join(f"{t['name']}: {t['dtype']}" if t else "-" for t in lay["inputs"]) + ")" if lay.get("inputs") else "")
              for i, lay in enumerate(m["layers"])]
    return "\n".join(lines)
