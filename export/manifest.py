"""manifest.json: the one contract between `export` and every later stage.

`export/` writes it through `Manifest.write`; build, validate, the runtime, deploy and the Triton model
read an export only through `Manifest.load` and the lookups here, never by indexing the JSON. What
it fixes, in one place:
- graph names (`layer_03.prefill`, `embed`, ...), kinds and modes, and which graphs generation needs;
- every graph's ports: name, dtype, symbolic shape, role, and the state a state port carries;
- the precision of weights, activations and KV cache as one object (`Precision`), with the
  calibrated scales it needs;
- integrity: the size and sha256 of every file it names (graphs, weights, the calibration file),
  verified by whoever reads them (`Manifest.verify`), so a swapped or damaged file is an error
  before anything runs.
This module imports neither torch nor onnx at load time: a serving process reads it too.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from qwen3next_trt.errors import InputError
from qwen3next_trt.hashing import verified_sha256
from qwen3next_trt.outputs import write_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "qwen3next-trt/manifest"
# 2: sha256 of every file, typed precision (1: byte counts only; its exports must be made again)
MANIFEST_VERSION = 2
FLOAT8 = "float8e4m3fn"
PER_TOKEN = "per-token"  # the activation scales of dynamic FP8: computed in the graph per row


class Role(str, Enum):
    """What a port carries; the runtime and the validator feed ports by role, never by name guesses."""

    TOKENS = "tokens"
    POSITION = "position"
    MASK = "mask"
    ACTIVATION = "activation"
    STATE_IN = "state-in"
    STATE_OUT = "state-out"


class Kind(str, Enum):
    """The graph kinds an export has (export/kinds.py defines each one's wrapper and reference)."""

    EMBED = "embed"
    LINEAR_ATTENTION = "linear_attention"
    FULL_ATTENTION = "full_attention"
    FINAL = "final"
    LM_HEAD = "lm_head"
    MTP = "mtp"
    MODEL = "model"


PREFILL, DECODE, ANY = "prefill", "decode", "any"
MODES = (PREFILL, DECODE, ANY)
MTP_GRAPHS = ("mtp.prefill", "mtp.decode", "lm_head")


def group_name(kind: Kind, layer: int | None = None) -> str:
    """The name of a part's weights group: its graphs are `<group>.<mode>` (or `<group>` for `any`)."""
    return f"layer_{layer:02d}" if kind in (Kind.LINEAR_ATTENTION, Kind.FULL_ATTENTION) else kind.value


def graph_name(group: str, mode: str) -> str:
    return group if mode == ANY else f"{group}.{mode}"


def layer_graph_name(layer: int, mode: str) -> str:
    return graph_name(f"layer_{layer:02d}", mode)


def state_tag(layer: int) -> str:
    """Prefix of a layer's state ports inside the stitched model graph."""
    return f"layer_{layer:02d}."


def _bad(path, field_name: str, expected: str, got=None):
    return InputError(f"{path}: field {field_name!r}: expected {expected}" + ("" if got is None else f", got {got!r}"))


# -- ports and graphs -------------------------------------------------------------------------------
@dataclass
class Port:
    """One graph input or output as exported: dims are ints or names ("batch", "seq", "past", "past + seq")."""

    name: str
    dtype: str  # ONNX element type name: float32, float16, bfloat16, int64, bool, float8e4m3fn
    shape: list
    role: Role
    state: str | None = None  # state ports: the state they carry; a state-in and its state-out share it

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)

    @property
    def grows(self) -> bool:
        """A key/value state: new tokens append along the `past` axis."""
        return "past" in self.shape

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "role": self.role.value}
        if self.state:
            d["state"] = self.state
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Port":
        return cls(d["name"], d["dtype"], list(d["shape"]), Role(d["role"]), d.get("state"))


@dataclass
class GraphRecord:
    """One exported ONNX graph: its file, its weights group, its kind and its ports."""

    name: str
    file: str
    weights: str  # key into Manifest.weights
    kind: Kind
    mode: str
    layer: int | None
    layer_type: str | None
    moe: bool
    inputs: list[Port]
    outputs: list[Port]
    nodes: int = 0
    ops: dict = field(default_factory=dict)
    opsets: dict = field(default_factory=dict)
    bytes: int = 0
    sha256: str = ""

    def ports(self, role: Role) -> list[Port]:
        return [p for p in self.inputs + self.outputs if p.role == role]

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.outputs]

    @property
    def is_attention(self) -> bool:
        """Reads a key mask (attention layers, the MTP layer, the stitched model)."""
        return any(p.role == Role.MASK for p in self.inputs)

    @property
    def has_state(self) -> bool:
        return any(p.role == Role.STATE_IN for p in self.inputs)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(kind=self.kind.value, inputs=[p.to_json() for p in self.inputs], outputs=[p.to_json() for p in self.outputs])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GraphRecord":
        return cls(d["name"], d["file"], d["weights"], Kind(d["kind"]), d["mode"], d.get("layer"), d.get("layer_type"),
                   bool(d.get("moe")), [Port.from_json(p) for p in d["inputs"]], [Port.from_json(p) for p in d["outputs"]],
                   d.get("nodes", 0), d.get("ops", {}), d.get("opsets", {}), d["bytes"], d["sha256"])


@dataclass
class FileRecord:
    """A file the manifest names (a weights file, the calibration file): size and content hash."""

    file: str
    bytes: int
    sha256: str
    tensors: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> "FileRecord":
        return cls(d["file"], d["bytes"], d["sha256"], d.get("tensors"))


# -- precision --------------------------------------------------------------------------------------
@dataclass
class WeightPrecision:
    format: str  # the export dtype (fp32 / fp16 / bf16), or float8e4m3fn
    scheme: str | None = None  # FP8: block, channel, or "checkpoint 128x128 blocks" (carried exactly)
    scales: str | None = None
    source: str | None = None

    @property
    def fp8(self) -> bool:
        return self.format == FLOAT8

    @property
    def quantizer_scheme(self) -> str:
        """The scheme to requantise the float weights with (a checkpoint's FP8 blocks are read as they are)."""
        return self.scheme if self.scheme in ("block", "channel") else "block"


@dataclass
class ActivationPrecision:
    format: str
    scheme: str | None = None
    scales: dict | str | None = None  # {activation name: scale} (static), PER_TOKEN (dynamic), None (float)
    calibration: dict | None = None

    @property
    def fp8(self) -> bool:
        return self.format == FLOAT8

    @property
    def dynamic(self) -> bool:
        return self.scales == PER_TOKEN

    @property
    def static_scales(self) -> dict | None:
        return self.scales if isinstance(self.scales, dict) else None


@dataclass
class KVCachePrecision:
    format: str
    scheme: str | None = None
    scales: dict | None = None  # {"model.layers.3.self_attn.key": scale, ...}
    calibration: dict | None = None

    @property
    def fp8(self) -> bool:
        return self.format == FLOAT8


@dataclass
class Precision:
    """The precision of an export, round-tripped through the manifest (top-level keys dtype,
    weights_precision, activation_precision, kv_cache)."""

    dtype: str  # fp32 / fp16 / bf16: the float type of activations and unquantised weights
    weights: WeightPrecision
    activations: ActivationPrecision
    kv_cache: KVCachePrecision

    @classmethod
    def float(cls, dtype: str) -> "Precision":
        return cls(dtype, WeightPrecision(dtype), ActivationPrecision(dtype), KVCachePrecision(dtype))

    @property
    def any_fp8(self) -> bool:
        return self.weights.fp8 or self.activations.fp8 or self.kv_cache.fp8

    def describe(self) -> str:
        parts = [self.dtype]
        if self.weights.fp8:
            parts.append(f"FP8 weights ({self.weights.quantizer_scheme})")
        if self.activations.fp8:
            parts.append("FP8 activations (" + ("dynamic per-token" if self.activations.dynamic else "static") + ")")
        if self.kv_cache.fp8:
            parts.append("FP8 KV cache")
        return ", ".join(parts)

    def to_json(self) -> dict:
        strip = lambda d: {k: v for k, v in asdict(d).items() if v is not None}  # noqa: E731
        return {"dtype": self.dtype, "weights_precision": strip(self.weights),
                "activation_precision": strip(self.activations), "kv_cache": strip(self.kv_cache)}

    @classmethod
    def from_json(cls, d: dict) -> "Precision":
        return cls(d["dtype"], WeightPrecision(**d["weights_precision"]), ActivationPrecision(**d["activation_precision"]),
                   KVCachePrecision(**d["kv_cache"]))


@dataclass
class Source:
    """Where the exported weights came from: a preset's seeded random weights, or a checkpoint."""

    kind: str  # "random" | "checkpoint"
    preset: str | None = None
    seed: int = 0
    init_version: int | None = None
    drawn_on: str | None = None
    path: str | None = None
    fingerprint: dict | str | None = None

    @property
    def model(self) -> str:
        """What WeightSource takes: the preset name, or the checkpoint path."""
        return self.preset if self.kind == "random" else self.path

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# -- the manifest -----------------------------------------------------------------------------------
@dataclass
class Manifest:
    config: dict  # the model's config.json (Hugging Face layout)
    precision: Precision
    source: Source
    max_positions: int
    graphs: list[GraphRecord]
    weights: dict[str, FileRecord]
    exporter: dict = field(default_factory=dict)
    opsets: dict = field(default_factory=dict)
    custom_ops: dict = field(default_factory=dict)
    state_layouts: dict = field(default_factory=dict)
    calibration_file: FileRecord | None = None
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    dir: Path | None = None  # where it was loaded from (not written)

    # -- reading and writing ----------------------------------------------------------------------
    @classmethod
    def load(cls, onnx_dir: str | Path) -> "Manifest":
        """The manifest of an export folder; InputError (one line naming the file and field) if it is
        missing, not JSON, not ours, of another version, or inconsistent."""
        onnx_dir = Path(onnx_dir)
        path = onnx_dir / MANIFEST
        if not path.is_file():
            raise InputError(f"{path}: not found: expected the output directory of `qwen3next-trt export`")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise _bad(path, "format", repr(MANIFEST_FORMAT), got)
        if d.get("version") != MANIFEST_VERSION:
            raise InputError(f"{path}: manifest version {d.get('version')!r}, this qwen3next-trt reads version {MANIFEST_VERSION} "
                             "(version 2 added content hashes): export again with this version")
        try:
            calib = d.get("calibration_file")
            m = cls(config=dict(d["config"]), precision=Precision.from_json(d), source=Source(**d["source"]),
                    max_positions=int(d["max_positions"]), graphs=[GraphRecord.from_json(g) for g in d["graphs"]],
                    weights={k: FileRecord.from_json(w) for k, w in d["weights"].items()}, exporter=d.get("exporter", {}),
                    opsets=d.get("opsets", {}), custom_ops=d.get("custom_ops", {}), state_layouts=d.get("state_layouts", {}),
                    calibration_file=FileRecord.from_json(calib) if calib else None, seconds=d.get("seconds", 0.0),
                    created=d.get("created", ""), dir=onnx_dir)
        except KeyError as e:
            raise InputError(f"{path}: field {e.args[0]!r} missing: not a complete qwen3next-trt manifest") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path}: malformed ({type(e).__name__}: {e})") from None
        m.check()
        return m

    def to_json(self) -> dict:
        d = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "exporter": self.exporter, "created": self.created,
             "seconds": self.seconds, "source": self.source.to_json(), "config": self.config, **self.precision.to_json(),
             "opsets": self.opsets, "custom_ops": self.custom_ops, "max_positions": self.max_positions,
             "state_layouts": self.state_layouts, "weights": {k: w.to_json() for k, w in self.weights.items()},
             "graphs": [g.to_json() for g in self.graphs]}
        if self.calibration_file:
            d["calibration_file"] = self.calibration_file.to_json()
        return d

    def write(self, onnx_dir: str | Path) -> Path:
        path = write_file(Path(onnx_dir) / MANIFEST, json.dumps(self.to_json(), indent=2))
        self.dir = Path(onnx_dir)
        return path

    @property
    def path(self) -> Path:
        return (self.dir or Path(".")) / MANIFEST

    def check(self):
        """What a consistent manifest satisfies (an edited one that breaks it is refused)."""
        names = set()
        n = self.n_layers
        for g in self.graphs:
            if g.name in names:
                raise InputError(f"{self.path}: graph {g.name!r} listed twice")
            names.add(g.name)
            if g.weights not in self.weights:
                raise InputError(f"{self.path}: graph {g.name!r} names weights {g.weights!r}, which the manifest does not list")
            if g.mode not in MODES:
                raise _bad(self.path, f"graphs[{g.name}].mode", " / ".join(MODES), g.mode)
            if g.kind in (Kind.LINEAR_ATTENTION, Kind.FULL_ATTENTION) and not (isinstance(g.layer, int) and 0 <= g.layer < n):
                raise InputError(f"{self.path}: graph {g.name!r} is layer {g.layer!r}, but config.num_hidden_layers is {n}")
            for p in g.inputs + g.outputs:
                if p.role in (Role.STATE_IN, Role.STATE_OUT) and not p.state:
                    raise InputError(f"{self.path}: graph {g.name!r}: state port {p.name!r} names no state")
        if self.has(Kind.MODEL.value):
            states = {p.state for p in self.graph(Kind.MODEL.value).ports(Role.STATE_IN)}
            layers = {s.split(".")[0] for s in states}
            if len(layers) != n:
                raise InputError(f"{self.path}: the stitched model graph carries the states of {len(layers)} layers, "
                                 f"config.num_hidden_layers is {n}")

    # -- lookups ----------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def dtype(self) -> str:
        return self.precision.dtype

    @property
    def context_limit(self) -> int:
        """Positions the graphs' RoPE tables hold."""
        return int(self.max_positions or self.config["max_position_embeddings"])

    def has(self, name: str) -> bool:
        return any(g.name == name for g in self.graphs)

    def graph(self, name: str) -> GraphRecord:
        for g in self.graphs:
            if g.name == name:
                return g
        raise InputError(f"{self.path}: no graph {name!r} (have {', '.join(g.name for g in self.graphs[:4])}"
                         f"{' ...' if len(self.graphs) > 4 else ''})")

    def layer(self, i: int, mode: str) -> GraphRecord:
        return self.graph(layer_graph_name(i, mode))

    def groups(self) -> dict[str, list[GraphRecord]]:
        """Graphs by weights group, in export order (a part's prefill and decode share weights)."""
        out: dict[str, list[GraphRecord]] = {}
        for g in self.graphs:
            out.setdefault(g.weights, []).append(g)
        return out

    def select(self, spec: str | None, flag: str = "--graphs") -> list[GraphRecord]:
        """Graphs named by a comma list of graph names or groups (`layer_00` = its prefill + decode)."""
        if spec is None:
            return list(self.graphs)
        wanted = [w.strip() for w in spec.split(",") if w.strip()]
        if not wanted:
            raise InputError(f"{flag} {spec!r}: expected graph names or groups, e.g. layer_00,embed")
        match = lambda g, w: g.name == w or g.name.startswith(w + ".")  # noqa: E731
        missing = [w for w in wanted if not any(match(g, w) for g in self.graphs)]
        if missing:
            raise InputError(f"{flag} {spec!r}: no graph named {missing[0]!r} in {self.path} (have e.g. {self.graphs[0].name})")
        return [g for g in self.graphs if any(match(g, w) for w in wanted)]

    @property
    def has_mtp(self) -> bool:
        return all(self.has(n) for n in MTP_GRAPHS)

    def generation_graphs(self, mtp: bool | None = None) -> list[str]:
        """The graphs generation runs: embed, final, every layer's prefill and decode, and (mtp True,
        or None when the export has them) the MTP graphs. InputError naming what is missing."""
        needed = ["embed", "final"] + [layer_graph_name(i, m) for i in range(self.n_layers) for m in (PREFILL, DECODE)]
        if mtp is None:
            mtp = self.has_mtp
        if mtp:
            if not self.has_mtp:
                raise InputError(f"{self.path}: no MTP graphs ({', '.join(MTP_GRAPHS)}): export a model with an MTP head and --layers all")
            needed += list(MTP_GRAPHS)
        missing = [g for g in needed if not self.has(g)]
        if missing:
            raise InputError(f"{self.path}: not a full export: graph(s) {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''} missing (export with --layers all)")
        return needed

    def kv_scales(self, record: GraphRecord) -> dict[str, float]:
        """{port: scale} of a graph's float8 key/value ports; empty without an FP8 KV cache. A port's
        state ("key", "layer_03.value") names its layer, the record names the layer of a layer graph."""
        kv = self.precision.kv_cache
        if not kv.fp8:
            return {}
        out = {}
        for p in record.inputs + record.outputs:
            if p.dtype != FLOAT8:
                continue
            tag, _, which = p.state.rpartition(".")
            if tag:  # the stitched model: "layer_03.key"
                prefix = f"model.layers.{int(tag.removeprefix('layer_'))}."
            elif record.kind == Kind.MTP:
                prefix = "mtp.layers.0."
            else:
                prefix = f"model.layers.{record.layer}."
            out[p.name] = kv.scales[f"{prefix}self_attn.{which}"]
        return out

    @property
    def total_weight_bytes(self) -> int:
        return sum(w.bytes for w in self.weights.values())

    # -- integrity --------------------------------------------------------------------------------
    def files_of(self, graphs: list[GraphRecord] | None = None) -> list[tuple[str, FileRecord | GraphRecord]]:
        """(what, record) for every file the given graphs (default: all) need: graph files and weights."""
        graphs = self.graphs if graphs is None else graphs
        out, seen = [], set()
        for g in graphs:
            for key, rec in ((g.file, g), (g.weights, self.weights[g.weights])):
                if key not in seen:
                    seen.add(key)
                    out.append((g.name, rec))
        return out

    def verify(self, graphs: list[GraphRecord] | None = None, progress=None) -> float:
        """Every file the given graphs need exists with the recorded size and sha256 (cached per file
        identity, see hashing.verified_sha256). Returns the seconds spent hashing."""
        import time

        t0, hashed = time.time(), 0
        for owner, rec in self.files_of(graphs):
            path = self.dir / rec.file
            if not path.is_file():
                raise InputError(f"{path}: missing (named by {self.path} for graph {owner})")
            size = path.stat().st_size
            if size != rec.bytes:
                raise InputError(f"{path}: {size} bytes, {self.path} records {rec.bytes}: the file was changed or "
                                 "replaced after export (export again)")
            digest, fresh = verified_sha256(path)
            hashed += size if fresh else 0
            if digest != rec.sha256:
                raise InputError(f"{path}: content hash {digest[:12]}... differs from {rec.sha256[:12]}... recorded in "
                                 f"{self.path}: the file was changed or replaced after export (export again)")
        if progress and hashed:
            progress(f"[verify] {hashed / 2**20:.1f} MiB hashed in {time.time() - t0:.1f} s")
        return time.time() - t0

    def check_graph_io(self, graphs: list[GraphRecord] | None = None):
        """Each graph file's inputs and outputs are the ones the manifest lists, and it parses as ONNX."""
        import onnx

        for g in self.graphs if graphs is None else graphs:
            path = self.dir / g.file
            try:
                model = onnx.load(str(path), load_external_data=False)
            except Exception as e:  # onnx raises DecodeError / google.protobuf errors for garbage
                raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
            have = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
            if have != (g.input_names, g.output_names):
                raise InputError(f"{path}: inputs/outputs {have} do not match manifest graph {g.name} "
                                 f"{(g.input_names, g.output_names)}")


def is_export(path: str | Path) -> bool:
    """Whether `path` holds an export written by this tool: its manifest's `format` says so (a
    folder that merely has some manifest.json is not ours to replace)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
