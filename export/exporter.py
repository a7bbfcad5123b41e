"""`qwen3next-trt export`: the reference model, layer by layer, into ONNX graphs plus manifest.json.

For each selected part the weights are materialised alone (a checkpoint's layer, or a preset's
seeded random layer), traced twice (prefill: batch and sequence dynamic; decode: one token), and
the two graphs share one weights file. manifest.json says what every graph's inputs, outputs and
states are; later stages read it and nothing else.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxscript
import torch

import qwen3next_trt
from qwen3next_trt.tables import text_table
from qwen3next_trt.errors import InputError
from qwen3next_trt.outputs import check_output, staged
from qwen3next_trt.model.config import LINEAR_ATTENTION
from qwen3next_trt.model.fp8 import PER_TOKEN, SCHEMES, WeightQuantizer
from qwen3next_trt.model.loader import WeightSource, layer_prefix
from qwen3next_trt.model.stats import export_part_bytes, model_stats
from qwen3next_trt.hashing import file_sha256
from qwen3next_trt.progress import Eta
from qwen3next_trt.sessions import EXPORT_DTYPES, torch_dtype

from . import kinds as G
from .custom_ops import CUSTOM_OPS, MS_DOMAIN, TRANSLATION_TABLE
from .manifest import (MANIFEST, MANIFEST_FORMAT, ActivationPrecision, FileRecord, GraphRecord, Kind, KVCachePrecision,
                       Manifest, Port, Precision, Source, WeightPrecision, graph_name, is_export)
from .onnx_files import check_graph, describe_graph, share_weights

OPSET = 23
PRECISIONS = ("none", "fp8")  # fp8: FP8 (E4M3) weights, dequantised in the graph
# FP8 activations: static per-tensor scales from calibration, or per-token scales computed in the graph
ACTIVATIONS = ("none", "fp8", "fp8-dynamic")
KV_CACHES = ("none", "fp8")  # fp8: attention key/value states as float8e4m3fn, static per-tensor scales per layer
STITCHED_MAX_BYTES = 1 << 30  # the whole-model graph only for small models
EXAMPLE_SIZES = {"batch": 2, "seq": 5, "past": 3}  # distinct, > 1: torch.export specialises 0 and 1

STATE_LAYOUTS = {
    "conv_state": "[batch, conv_dim, K-1]: the last K-1 inputs of the depthwise causal conv, channels [q | k | v]; zeros at sequence start",
    "recurrent_state": "[batch, value_heads, key_head_dim, value_head_dim] float32: the gated delta rule state S (o = S^T q); zeros at sequence start",
    "key/value": "[batch, kv_heads, past, head_dim]: keys after q/k norm and RoPE, values; empty (past = 0) at sequence start; present = past + new tokens",
}


@dataclass
class Selection:
    layers: list[int] = field(default_factory=list)
    embed: bool = False
    final: bool = False
    mtp: bool = False
    model: bool = False


def parse_selection(spec: str | None, n_layers: int, has_mtp: bool, small: bool) -> Selection:
    """`--layers`: 'all' (default), or a comma list of layer indices, ranges a-b, and the words
    embed, final (norm + LM head, and lm_head alone), mtp, model (stitched whole model), layers."""
    if spec in (None, "", "all"):
        return Selection(list(range(n_layers)), True, True, has_mtp, small)
    sel = Selection()
    for token in spec.split(","):
        token = token.strip()
        try:
            if token in ("embed", "final", "mtp", "model"):
                setattr(sel, token, True)
            elif token == "layers":
                sel.layers += range(n_layers)
            elif "-" in token:
                a, b = (int(x) for x in token.split("-"))
                if a > b:
                    raise InputError(f"--layers {spec!r}: range {token!r} is reversed: expected a-b with a <= b")
                sel.layers += range(a, b + 1)
            else:
                sel.layers.append(int(token))
        except ValueError:
            raise InputError(f"--layers {spec!r}: cannot read {token!r}: expected layer numbers, ranges a-b, or embed/final/mtp/model/layers") from None
    bad = [i for i in sel.layers if not 0 <= i < n_layers]
    if bad:
        raise InputError(f"--layers {spec!r}: layer {bad[0]} out of range 0..{n_layers - 1}")
    if sel.mtp and not has_mtp:
        raise InputError(f"--layers {spec!r}: this model has no MTP layer")
    if sel.model and not small:
        raise InputError(f"--layers {spec!r}: the stitched whole-model graph is only for small models (< {STITCHED_MAX_BYTES >> 20} MiB of weights)")
    sel.layers = sorted(set(sel.layers))
    if not (sel.layers or sel.embed or sel.final or sel.mtp or sel.model):
        raise InputError(f"--layers {spec!r}: selects no graph")
    return sel


def _dim_spec(name: str, dims: dict, sizes: dict):
    """torch.export's spec for a symbolic dim: a Dim, a Dim plus a constant ("past+seq" in a decode
    graph, where seq is 1), or DYNAMIC for a sum of two Dims, which torch.export infers itself."""
    parts = name.split("+")
    free = [dims[p] for p in parts if p in dims]
    if len(free) > 1:
        return torch.export.Dim.DYNAMIC
    return free[0] + sum(sizes[p] for p in parts if p not in dims) if len(parts) > 1 else free[0]


def _examples(ports: list[G.PortSpec], mode: str):
    """Example tensors and torch.export dynamic shapes for the input ports."""
    sizes = dict(EXAMPLE_SIZES, seq=EXAMPLE_SIZES["seq"] if mode == "prefill" else 1)
    dims = {"batch": torch.export.Dim("batch", min=1), "past": torch.export.Dim("past", min=0)}
    if mode == "prefill":
        dims["seq"] = torch.export.Dim("seq", min=1)
    g = torch.Generator().manual_seed(0)
    args, dynamic = [], []
    for p in ports:
        shape = [sum(sizes[part] for part in d.split("+")) if isinstance(d, str) else d for d in p.shape]
        if p.dtype == torch.bool:
            t = torch.ones(shape, dtype=torch.bool)
        elif p.dtype == torch.int64:
            t = torch.randint(0, 8, shape, generator=g) if p.role != G.POSITION else torch.arange(shape[1]).expand(*shape).contiguous()
        else:
            t = torch.randn(shape, generator=g).to(p.dtype)
        args.append(t)
        dynamic.append({i: _dim_spec(d, dims, sizes) for i, d in enumerate(p.shape)
                        if isinstance(d, str) and any(part in dims for part in d.split("+"))} or None)
    return tuple(args), tuple(dynamic)


# The exporter warns once per run about torchvision ops it cannot register; nothing here uses them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _trace(module: torch.nn.Module, mode: str, path: Path):
    args, dynamic = _examples(module.inputs, mode)
    fixed = getattr(module, "fixed_args", len(args))  # forward(a, b, *rest): torch.export wants (a, b, (rest...))
    if fixed < len(args):
        dynamic = (*dynamic[:fixed], tuple(dynamic[fixed:]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, custom_translation_table=TRANSLATION_TABLE,
            input_names=[p.name for p in module.inputs], output_names=[p.name for p in module.outputs],
            dynamic_shapes=dynamic, verbose=False,
        )
    program.save(str(path), external_data=True)
    _name_sum_dims(path, module.inputs, mode)


def _name_sum_dims(path: Path, ports: list[G.PortSpec], mode: str):
    """torch.export names an input dim that is a sum of two dims (the attention mask's past+seq) like
    s82; give it the name the outputs carry ("past + seq", "past + 1" in decode graphs)."""
    sums = {p.name: [(i, d) for i, d in enumerate(p.shape) if isinstance(d, str) and "+" in d] for p in ports}
    if not any(sums.values()):
        return
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        for i, d in sums.get(value.name, []):
            # a decode graph's seq is the constant 1
            name = " + ".join("1" if part == "seq" and mode == "decode" else part for part in d.split("+"))
            value.type.tensor_type.shape.dim[i].dim_param = name
    onnx.save(model, str(path))


def _expected_custom_ops(kind: str, layer_type: str | None, moe: bool) -> dict[str, int]:
    ops = {}
    if layer_type == LINEAR_ATTENTION:
        ops.update({"com.microsoft::LinearAttention": 1, "com.microsoft::CausalConvWithState": 1})
    elif layer_type is not None:
        ops.update({"Attention": 1, "RotaryEmbedding": 2})
    if moe:
        ops["com.microsoft::MoE"] = 1
    return ops


def _ports_record(ports: list[G.PortSpec], actual: list[dict]) -> list[Port]:
    """The manifest's ports: roles and states from the wrapper, dtypes and (named) shapes from the file."""
    by_name = {a["name"]: a for a in actual}
    out = []
    for p in ports:
        a = by_name.get(p.name)
        if a is None:
            raise RuntimeError(f"exported graph lacks port {p.name!r} (has {sorted(by_name)})")
        out.append(Port(p.name, a["dtype"], a["shape"], p.role, p.state))
    return out


class Exporter:
    def __init__(self, model: str, out_dir: str | Path, dtype: str = "fp32", layers: str | None = None,
                 max_positions: int | None = None, seed: int = 0, force: bool = False, precision: str = "none",
                 fp8_scheme: str = "block", activations: str = "none", calib: int = 16, calib_seq: int = 256,
                 calib_percentile: float | None = None, kv_cache: str = "none", device: str = "cpu",
                 calib_file: str | Path | None = None, progress=print):
        if dtype not in EXPORT_DTYPES:
            raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
        if precision not in PRECISIONS:
            raise InputError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if fp8_scheme not in SCHEMES:
            raise InputError(f"--fp8-weights {fp8_scheme!r}: expected one of {', '.join(SCHEMES)}")
        if activations not in ACTIVATIONS:
            raise InputError(f"--activations {activations!r}: expected one of {', '.join(ACTIVATIONS)}")
        if activations != "none" and precision != "fp8":
            raise InputError(f"--activations {activations} needs --precision fp8 (FP8 weights)")
        if calib < 1 or calib_seq < 2:
            raise InputError(f"--calib {calib}: expected at least 1 sequence (of >= 2 tokens)")
        if calib_percentile is not None and not 50 < calib_percentile <= 100:
            raise InputError(f"--calib-percentile {calib_percentile}: expected a percentile in (50, 100]")
        self.activations, self.calib = activations, (calib, calib_seq, calib_percentile)
        from qwen3next_trt.model.calibration import calibration_device

        # where calibration runs (the tracing itself is CPU work); checked even when nothing is calibrated
        self.device = calibration_device(device)
        self.calib_file = Path(calib_file) if calib_file else None
        if self.calib_file is not None and self.calib_file.is_dir():
            raise InputError(f"--calib-file {calib_file}: is a directory: expected a JSON file (made or to be made by calibration)")
        self.calibration_record: dict | None = None
        self.act_scales: dict[str, float] | str | None = PER_TOKEN if activations == "fp8-dynamic" else None
        if kv_cache not in KV_CACHES:
            raise InputError(f"--kv-cache {kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
        self.kv_cache = kv_cache
        self.kv_scales: dict[str, float] | None = None
        self.dtype_name, self.dtype = dtype, torch_dtype(dtype)
        self.source = WeightSource(model, seed=seed, dtype=self.dtype)
        self.config = cfg = self.source.config
        self.quantizer = WeightQuantizer(fp8_scheme, self.source.reader) if precision == "fp8" else None
        self.out_dir = Path(out_dir)
        small = model_stats(cfg).bf16_bytes < STITCHED_MAX_BYTES
        self.selection = parse_selection(layers, cfg.num_hidden_layers, cfg.num_mtp_layers > 0, small)
        limit = cfg.max_position_embeddings
        self.max_positions = min(limit, 65536) if max_positions is None else max_positions
        if not 1 <= self.max_positions <= limit:
            raise InputError(f"--max-positions {max_positions}: expected 1..{limit} (max_position_embeddings)")
        self.progress, self.force = progress, force
        self.records: list[GraphRecord] = []
        self.weights: dict[str, FileRecord] = {}

    # -- one group of graphs (prefill + decode of one part), sharing one weights file -------------
    def _export_group(self, work: Path, group: str, module, kind: str, modes, layer=None, layer_type=None, moe=False,
                      t0: float | None = None, eta: tuple[Eta, int] | None = None):
        t0 = time.time() if t0 is None else t0
        paths = []
        for mode in modes:
            name = graph_name(group, mode)
            path = work / f"{name}.onnx"
            _trace(module, "prefill" if mode in ("prefill", "any") else "decode", path)
            paths.append((name, mode, path))
        weights = share_weights([p for _, _, p in paths], f"{group}.weights")
        self.weights[weights["file"]] = FileRecord(weights["file"], weights["bytes"], file_sha256(work / weights["file"]),
                                                   weights["tensors"])
        expected = _expected_custom_ops(kind, layer_type, moe)
        for name, mode, path in paths:
            check_graph(path)
            info = describe_graph(path)
            found = {op: info["ops"].get(op, 0) for op in expected}
            if found != expected:
                raise RuntimeError(f"{name}: expected exactly {expected} in the traced graph, found {found}")
            self.records.append(GraphRecord(
                name, path.name, f"{group}.weights", Kind(kind), mode, layer, layer_type, moe,
                _ports_record(module.inputs, info["inputs"]), _ports_record(module.outputs, info["outputs"]),
                info["nodes"], info["ops"], info["opsets"], path.stat().st_size, file_sha256(path)))
        dt = time.time() - t0
        self.progress(f"[export] {group:<12} {kind:<16} {'/'.join(m for m in modes):<14} "
                      f"{self.records[-1].nodes:>4} nodes  {weights['bytes'] / 2**20:9.1f} MiB  {dt:6.1f} s"
                      + (f"  {eta[0].step(eta[1], dt)}" if eta else ""))

    def _parts(self):
        """(group, build module, kind, modes, layer, layer_type, moe) in export order; modules built lazily."""
        cfg, src, sel = self.config, self.source, self.selection
        rope = lambda: G.RopeCache(cfg, self.max_positions, self.dtype)  # noqa: E731
        if sel.embed:
            yield "embed", lambda: G.EmbedGraph(src.embedding(), self.dtype), "embed", ("any",), None, None, False
        for i in sel.layers:
            t = cfg.layer_types[i]
            yield (f"layer_{i:02d}", lambda i=i, t=t: G.LayerGraph(src.layer(i), cfg, None if t == LINEAR_ATTENTION else rope(), self.dtype,
                                                                  self.quantizer, layer_prefix(i, cfg), self.act_scales, self.kv_scales),
                   t, ("prefill", "decode"), i, t, cfg.is_moe_layer(i))
        if sel.final:
            yield "final", lambda: G.FinalGraph(src.final_norm(), src.lm_head(), self.dtype), "final", ("any",), None, None, False
            yield "lm_head", lambda: G.LMHeadGraph(src.lm_head(), self.dtype), "lm_head", ("any",), None, None, False
        if sel.mtp:
            yield ("mtp", lambda: G.MTPGraph(src.mtp(), cfg, rope(), self.dtype, self.quantizer, self.act_scales, self.kv_scales), "mtp", ("prefill", "decode"),
                   cfg.num_hidden_layers, "full_attention", cfg.num_experts > 0)
        if sel.model:
            def whole():
                model = src.whole_model(with_mtp=False)
                return G.ModelGraph(model, rope(), self.dtype, self.quantizer, self.act_scales, self.kv_scales)
            yield "model", whole, "model", ("prefill", "decode"), None, None, False

    def run(self) -> Manifest:
        reader = self.source.reader
        out = check_output(self.out_dir, "--out", {"checkpoint (--model)": reader.path if reader else None,
                                                   "--calib-file": self.calib_file},
                           is_export, "an export", f"{MANIFEST} with format {MANIFEST_FORMAT!r}")
        parent = out.parent
        parent.mkdir(parents=True, exist_ok=True)
        parts = list(self._parts())
        sizes = [self._part_bytes(kind, layer) for _, _, kind, _, layer, _, _ in parts]
        self._check_disk(parent, sizes)
        with staged(out) as work:
            manifest = self._write(work, parts, sizes)
        return manifest

    def _write(self, work: Path, parts: list, sizes: list[int]) -> Manifest:
        t0 = time.time()
        if self.activations == "fp8" or self.kv_cache == "fp8":
            scales = self._calibrate()
            kv = {n: s for n, s in scales.items() if n.endswith((".self_attn.key", ".self_attn.value"))}
            if self.activations == "fp8":
                self.act_scales = {n: s for n, s in scales.items() if n not in kv}
            if self.kv_cache == "fp8":
                self.kv_scales = kv
        self.progress(f"[export] {len(parts)} parts of {self.source.describe()} -> {self.out_dir} "
                      f"({self.dtype_name}, opset {OPSET} + {MS_DOMAIN} 1, max positions {self.max_positions}; "
                      f"about {_size(sum(sizes))} of weights; traced on the CPU)")
        eta = Eta(sum(sizes))  # a part's time grows with its weights: ETA by bytes, not by part count
        for (group, build, kind, modes, layer, layer_type, moe), size in zip(parts, sizes):
            t_part = time.time()
            module = build()
            self._export_group(work, group, module, kind, modes, layer, layer_type, moe, t0=t_part, eta=(eta, size))
            del module
        manifest = self._manifest(time.time() - t0)
        manifest.write(work)
        manifest.dir = self.out_dir
        return manifest

    # -- calibration and disk space -----------------------------------------------------------------
    def _calibrate(self) -> dict[str, float]:
        """Scales of the exported parts only: layer i needs layers 0..i and nothing after; the stitched
        model and the MTP layer need every layer. Reuses and extends --calib-file."""
        from qwen3next_trt.model.calibration import (
            CalibrationFile, calibrate, calibration_settings, calibration_tokens, describe_device)

        count, seq, pct = self.calib
        sel, n = self.selection, self.config.num_hidden_layers
        layers = list(range(n)) if sel.model or sel.mtp else sel.layers
        if self.device.type == "cpu":
            source = self.source
        else:
            # bf16 on the GPU; a preset's weights still drawn on the CPU, so they are the exported ones
            source = WeightSource(self.source.model, seed=self.source.seed, dtype=torch.bfloat16, device=self.device, draw="cpu")
        settings = calibration_settings(source, count, seq, pct)
        store = CalibrationFile(self.calib_file, settings) if self.calib_file else None
        tokens = calibration_tokens(count, seq, self.config.vocab_size)
        self.progress(f"[calibrate] {count} x {seq} tokens of Python stdlib text, "
                      f"{'amax' if pct is None else f'{pct} percentile'} per activation, "
                      f"{len(layers)} layer(s){' + MTP' if sel.mtp else ''} wanted, on {describe_device(self.device)}"
                      + (f", file {self.calib_file}" if store else ""))
        t0 = time.time()
        scales = calibrate(source, tokens, pct, self.progress, layers=layers, mtp=sel.mtp, store=store)
        self.calibration_record = dict(_calibration_record(self.calib), device=describe_device(self.device),
                                       compute_dtype="float32" if self.device.type == "cpu" else "bfloat16",
                                       file=str(self.calib_file) if store else None, seconds=round(time.time() - t0, 1))
        self.progress(f"[calibrate] {len(scales)} scales in {time.time() - t0:.1f} s")
        return scales

    def _part_bytes(self, kind: str, layer: int | None) -> int:
        part = "layer" if kind in ("linear_attention", "full_attention") else kind
        # layers of one type and MoE-ness weigh the same: build one of each (an 80B layer takes ~0.2 s on meta)
        key = (kind, self.config.is_moe_layer(layer) if part == "layer" else None)
        cache = self.__dict__.setdefault("_bytes_cache", {})
        if key not in cache:
            cache[key] = export_part_bytes(self.config, part, self.dtype.itemsize, self.quantizer is not None, self.max_positions, layer)
        return cache[key]

    def _check_disk(self, parent: Path, sizes: list[int]):
        # A part's prefill and decode graphs are first saved with their own data and then merged into
        # one weights file, so the largest part briefly takes three times its size on disk.
        need = int((sum(sizes) + 2 * max(sizes, default=0)) * 1.05) + (64 << 20)
        free = shutil.disk_usage(parent).free
        if free < need:
            raise InputError(f"--out {self.out_dir}: this export needs about {_size(need)} of disk "
                             f"({len(sizes)} parts, {_size(sum(sizes))} of weights in {self.dtype_name}"
                             f"{' + FP8' if self.quantizer else ''}) and {parent} has {_size(free)} free: "
                             "free space, or give --out on a disk with that much free")

    def _precision(self) -> Precision:
        p = Precision.float(self.dtype_name)
        if self.quantizer:
            p.weights = WeightPrecision(**self.quantizer.describe())
        if self.act_scales == PER_TOKEN:
            p.activations = ActivationPrecision(
                "float8e4m3fn", "dynamic per-token: scale = max|x| / 448 per row of the last axis, computed in the graph; "
                "blocked QuantizeLinear -> DequantizeLinear before each FP8 MatMul and MoE", PER_TOKEN)
        elif self.act_scales is not None:
            p.activations = ActivationPrecision(
                "float8e4m3fn", "static per-tensor, QuantizeLinear -> DequantizeLinear before each FP8 MatMul and MoE",
                self.act_scales, self.calibration_record)
        if self.kv_scales is not None:
            p.kv_cache = KVCachePrecision(
                "float8e4m3fn", "static per-tensor scales per attention layer (key, value); past DequantizeLinear, new "
                "tokens Q/DQ before attention, present QuantizeLinear", self.kv_scales, self.calibration_record)
        return p

    def _manifest(self, seconds: float) -> Manifest:
        cfg = self.config.to_hf_dict()
        cfg["num_nextn_predict_layers"] = self.config.num_mtp_layers
        calib = None
        if self.calibration_record and self.calib_file and self.calib_file.is_file():
            calib = FileRecord(str(self.calib_file.resolve()), self.calib_file.stat().st_size, file_sha256(self.calib_file))
        return Manifest(
            config=cfg, precision=self._precision(), source=Source(**self.source.describe()), max_positions=self.max_positions,
            graphs=self.records, weights=self.weights, calibration_file=calib, seconds=round(seconds, 1),
            exporter={"package": "qwen3next-trt", "version": qwen3next_trt.__version__, "torch": torch.__version__,
                      "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
            opsets={"ai.onnx": OPSET, MS_DOMAIN: 1},
            custom_ops={op: {"domain": MS_DOMAIN, "version": v} for op, v in CUSTOM_OPS.items()},
            state_layouts=STATE_LAYOUTS)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _calibration_record(calib: tuple) -> dict:
    count, seq, pct = calib
    return {"sequences": count, "tokens_per_sequence": seq, "statistic": "amax" if pct is None else f"percentile {pct}",
            "text": "Python standard library sources (bytes as token ids)"}


def summary_table(manifest: Manifest) -> str:
    rows = []
    for g in manifest.graphs:
        custom = sum(c for o, c in g.ops.items() if o.startswith(MS_DOMAIN))
        native = f"{g.ops.get('Attention', 0)}/{g.ops.get('RotaryEmbedding', 0)}"
        rows.append((g.name, g.mode, str(g.nodes), str(custom), native, f"{manifest.weights[g.weights].bytes / 2**20:.1f}"))
    lines = text_table(("graph", "mode", "nodes", "custom ops", "Attention/Rotary", "weights MiB"), rows, left=2)
    lines.append(f"{len(manifest.graphs)} graphs, {len(manifest.weights)} weight files, "
                 f"{manifest.total_weight_bytes / 2**20:.1f} MiB, {manifest.seconds} s")
    return "\n".join(lines)
