"""Activation ranges for static FP8 scales: run calibration text through the model one layer at a time.

Text: the Python standard library's own source files (they ship with every Python; no download),
as bytes. Token ids are the byte values (taken modulo the vocabulary when it is smaller than 256):
meaningful for byte-level models such as the trained `tiny` (bench/train_tiny.py); for a model with
a real tokenizer the ids are plausible-looking noise, and a user should calibrate with their own text.

The model is streamed: one decoder layer is materialised at a time (the 80B model never needs to fit),
its activations recorded by hooks, and its output fed to the next layer. Layer i's scales depend only
on layers <= i, so calibrating layers S runs layers 0..max(S) and nothing after (the MTP layer only
when asked: it needs the last layer's output). On a GPU layers run in bf16 (the ranges are taken
in float32); on the CPU in float32, because bf16 measured 2.2x slower there (NOTES.md).

A calibration file (`CalibrationFile`) keeps every finished layer's scales, with the settings they
were made with and the hidden states after the last finished layer, so a run can resume or be split
(layers 0-23 today, 24-47 tomorrow) without recomputing or even materialising earlier layers.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import sysconfig
import time
from pathlib import Path

import torch

from qwen3next_trt.errors import InputError
from qwen3next_trt.hashing import file_sha256
from qwen3next_trt.progress import Eta, duration

from .cache import AttentionCache
from .fp8 import FP8_MAX, activation_points
from .config import LINEAR_ATTENTION
from .loader import WeightSource, layer_prefix
from .modeling_qwen3_next import Qwen3NextRotaryEmbedding

CALIBRATION_FORMAT = "qwen3next-trt/calibration"
CALIBRATION_VERSION = 1
CALIBRATION_TEXT = "Python standard library sources (bytes as token ids)"
MTP = "mtp"  # the MTP layer's key among the layers of a calibration file


def stdlib_sources() -> list[Path]:
    """The Python standard library's own *.py files (tests excluded), sorted: text that ships with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parts)


@functools.lru_cache(maxsize=1)
def _calibration_text() -> torch.Tensor:
    # walking the whole stdlib takes seconds; the text is the same for every call in a process
    files = stdlib_sources()[:400]
    return torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in files)), dtype=torch.uint8).long()


def calibration_tokens(count: int, seq: int, vocab: int) -> torch.Tensor:
    """[count, seq] token ids from the stdlib sources (deterministic: sorted files, evenly spaced windows)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = _calibration_text()
    if data.numel() < count * seq:
        raise InputError(f"--calib {count}: the calibration text ({root}) holds {data.numel():,} tokens, "
                         f"fewer than the {count * seq:,} asked ({count} x {seq})")
    step = data.numel() // count
    return torch.stack([data[i * step : i * step + seq] for i in range(count)]) % vocab


def calibration_settings(source: WeightSource, count: int, seq: int, percentile: float | None) -> dict:
    """What a calibration's scales depend on; a calibration file made with other settings is refused."""
    identity = source.describe()
    # A checkpoint is its fingerprint: the same checkpoint copied to a GPU machine calibrates the same.
    identity.pop("path", None)
    return {"sequences": count, "tokens_per_sequence": seq,
            "statistic": "amax" if percentile is None else f"percentile {percentile}",
            "text": CALIBRATION_TEXT, "source": identity}


def calibration_device(device: str) -> torch.device:
    """`--device`: cpu, cuda or cuda:N; a CUDA device must be visible."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class CalibrationFile:
    """A JSON file: {activation name: scale} ("scales"), which layers are complete (each with the names
    it holds, its device, dtype and times), the settings, and the hidden states after the last
    finished layer in `<file>.hidden.safetensors` (float32 [sequences, tokens, hidden]; checked by
    sha256, ignored if it does not match). Both are written to a temporary name and renamed, after
    every layer, so an interrupted run loses at most the layer it was in."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = settings
        self.scales: dict[str, float] = {}
        self.layers: dict[str, dict] = {}
        self.hidden_record: dict | None = None
        if self.path.exists():
            self._load()

    @property
    def hidden_path(self) -> Path:
        return self.path.with_name(self.path.name + ".hidden.safetensors")

    def _load(self):
        where = str(self.path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: not a readable calibration file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise InputError(f"{where}: format: expected {CALIBRATION_FORMAT!r} (a file written by a calibration)")
        if data.get("version") != CALIBRATION_VERSION:
            raise InputError(f"{where}: version: expected {CALIBRATION_VERSION}, found {data.get('version')!r}")
        theirs = data.get("settings", {})
        for key, ours in self.settings.items():
            if key == "source":
                for sub in sorted(set(ours) | set(theirs.get("source", {}))):
                    a, b = theirs.get("source", {}).get(sub), ours.get(sub)
                    if a != b:
                        raise InputError(f"{where}: settings.source.{sub}: the file was calibrated with {a!r}, this run uses {b!r}; "
                                         "use another calibration file for these weights")
            elif theirs.get(key) != ours:
                raise InputError(f"{where}: settings.{key}: the file was calibrated with {theirs.get(key)!r}, this run uses {ours!r}; "
                                 "use the same calibration settings or another calibration file")
        scales, layers = data.get("scales", {}), data.get("layers", {})
        for key, rec in layers.items():
            missing = [n for n in rec.get("names", []) if n not in scales]
            if missing:
                raise InputError(f"{where}: layers.{key}: activation {missing[0]!r} has no entry in scales")
        self.scales, self.layers, self.hidden_record = scales, layers, data.get("hidden")

    def complete(self, key: str) -> bool:
        return key in self.layers

    def hidden_after(self) -> int | None:
        """The layer after which the stored hidden states were taken, if the file is there and intact."""
        rec = self.hidden_record
        if rec is None or not self.hidden_path.exists() or file_sha256(self.hidden_path) != rec.get("sha256"):
            return None
        return rec["after_layer"]

    def load_hidden(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.hidden_path))["hidden"]

    def record(self, key: str, scales: dict[str, float], info: dict, hidden: torch.Tensor | None = None, after_layer: int | None = None):
        if key is not None:
            self.scales.update(scales)
            self.layers[key] = dict(info, names=sorted(scales))
        if hidden is not None:
            from safetensors.torch import save

            blob = save({"hidden": hidden.detach().float().cpu().contiguous()})
            _write_atomic(self.hidden_path, blob)
            self.hidden_record = {"file": self.hidden_path.name, "after_layer": after_layer, "sha256": hashlib.sha256(blob).hexdigest()}
        self.save()

    def save(self):
        order = lambda k: (1, 0) if k == MTP else (0, int(k))  # noqa: E731
        data = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "settings": self.settings,
                "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "layers": {k: self.layers[k] for k in sorted(self.layers, key=order)},
                "hidden": self.hidden_record,
                "scales": dict(sorted(self.scales.items()))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps(data, indent=1).encode())


def _scale(r: float) -> float:
    return r / FP8_MAX if r > 0 else 1.0


@torch.no_grad()
def calibrate(source: WeightSource, tokens: torch.Tensor, percentile: float | None = None, progress=print,
              layers=None, mtp: bool | None = None, store: CalibrationFile | None = None,
              dtype: torch.dtype | None = None, timings: dict | None = None) -> dict[str, float]:
    """{activation name: scale} of the decoder layers `layers` (default: all) and, if `mtp` (default:
    when all layers are asked and the model has one), the MTP layer; scale = range / 448, range = max |x|
    (or its `percentile`). Layers come from `source` (on its device), computed in `dtype` (default:
    float32 on the CPU, bf16 elsewhere); scales already in `store` are reused and new ones added to it.
    `timings`, if given, receives {layer key: {"materialise_s", "run_s"}} for the layers run.

    Names: a quantised linear's weight name for its input, `<prefix>mlp.experts` for a MoE input, and
    `<prefix>self_attn.key` / `.value` for what an attention layer stores in its KV cache."""
    cfg = source.config
    n = cfg.num_hidden_layers
    wanted = sorted(set(range(n) if layers is None else layers))
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise InputError(f"--layers: layer {bad[0]} out of range 0..{n - 1}")
    want_mtp = bool(cfg.num_mtp_layers) and (layers is None if mtp is None else mtp)
    keys = [str(i) for i in wanted] + ([MTP] if want_mtp else [])
    device = source.device
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    found: dict[str, float] = {}

    def result():
        have = dict(store.scales) if store is not None else {}
        have.update(found)
        names = set()
        for key in keys:
            names.update(store.layers[key]["names"] if store is not None and store.complete(key) else computed[key])
        return {name: have[name] for name in sorted(names)}

    computed: dict[str, list[str]] = {}
    todo = [k for k in keys if store is None or not store.complete(k)]
    if store is not None and len(todo) < len(keys):
        reused = [k for k in keys if k not in todo]
        progress(f"[calibrate] {len(reused)} of {len(keys)} layers reused from {store.path}: {_span(reused)}")
    if not todo:
        return result()

    # Run from the first layer whose input is not at hand up to the last one asked for.
    first_missing = min(n if k == MTP else int(k) for k in todo)
    last = n - 1 if MTP in todo else max(int(k) for k in todo)
    start, hidden = 0, None
    after = store.hidden_after() if store is not None else None
    if after is not None and after < first_missing:
        start, hidden = after + 1, store.load_hidden().to(device, dtype)
        progress(f"[calibrate] resuming after layer {after} from {store.hidden_path}")
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    rope = Qwen3NextRotaryEmbedding(cfg).to(device)
    rotate = rope.rotation(positions, dtype)
    next_embeds = None
    if hidden is None or MTP in todo:
        embed = source.embedding().to(dtype)
        if hidden is None:
            hidden = embed(tokens)
        if MTP in todo:
            next_embeds = embed(tokens[:, 1:])
        del embed

    run = list(range(start, last + 1)) + ([MTP] if MTP in todo else [])
    eta = Eta(len(run))
    progress(f"[calibrate] running {_span([str(i) for i in run if i != MTP])}{' + MTP' if MTP in todo else ''} "
             f"on {describe_device(device)} in {str(dtype).removeprefix('torch.')} (ranges in float32)")
    for key in run:
        ranges: dict[str, float] = {}
        handles = []

        def observe_tensor(name, x):
            x = x.detach().float().abs().flatten()
            r = torch.quantile(x[:: max(1, x.numel() // 1_000_000)], percentile / 100).item() if percentile else x.max().item()
            ranges[name] = max(ranges.get(name, 0.0), r)

        def observe(module, prefix):
            for name, sub in activation_points(module, prefix):
                handles.append(sub.register_forward_pre_hook(lambda m, args, name=name: observe_tensor(name, args[0])))

        t0 = time.perf_counter()
        if key == MTP:
            module = source.mtp().to(dtype)
            normed = source.final_norm().to(dtype)(hidden)
            prefix, what = "mtp.layers.0.", "MTP layer"
        else:
            module = source.layer(key).to(dtype)
            prefix = layer_prefix(key, cfg)
            what = f"layer {key:02d} {module.layer_type}{' + MoE' if cfg.is_moe_layer(key) else ''}"
        _sync(device)
        t1 = time.perf_counter()
        observe(module, "mtp." if key == MTP else prefix)
        if key == MTP:
            cache = AttentionCache()
            module(next_embeds, normed[:, :-1], rope.rotation(positions[:, :-1], dtype), cache)
        else:
            cache = None if module.layer_type == LINEAR_ATTENTION else AttentionCache()
            hidden = module(hidden, rotate, cache)
        for h in handles:
            h.remove()
        if cache is not None:
            observe_tensor(f"{prefix}self_attn.key", cache.key)
            observe_tensor(f"{prefix}self_attn.value", cache.value)
        _sync(device)
        t2 = time.perf_counter()
        del module, cache
        skey = MTP if key == MTP else str(key)
        scales = {name: _scale(r) for name, r in ranges.items()}
        times = {"materialise_s": round(t1 - t0, 3), "run_s": round(t2 - t1, 3)}
        if timings is not None:
            timings[skey] = times
        # a layer passed through on the way to the asked ones is kept too, unless the file has it already
        new = skey in todo or (skey not in keys and not (store is not None and store.complete(skey)))
        if new:
            found.update(scales)
            computed[skey] = sorted(scales)
        if store is not None:
            info = dict(times, device=str(device), dtype=str(dtype).removeprefix("torch."),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            keep_hidden = key != MTP and (store.hidden_record is None or key > store.hidden_record["after_layer"])
            store.record(skey if new else None, scales, info, hidden if keep_hidden else None, key if keep_hidden else None)
        status = f"{len(scales)} ranges" if new else "scales reused, run for its output"
        progress(f"[calibrate] {what}: {status}; materialise {duration(t1 - t0)}, run {duration(t2 - t1)}; "
                 f"{eta.step(1, t2 - t0)}")
    return result()


def _sync(device: torch.device):
    # GPU work is asynchronous: without this the times would land on whichever step waits first
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _span(keys: list[str]) -> str:
    """'0-5, 9, mtp' for a list of layer keys."""
    nums = sorted(int(k) for k in keys if k != MTP)
    parts, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(f"{nums[i]}" if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    if MTP in keys:
        parts.append(MTP)
    return "layers " + ", ".join(parts) if parts else "nothing"
