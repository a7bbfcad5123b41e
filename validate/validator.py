"""`qwen3next-trt validate`: every exported graph against the PyTorch reference, with polygraphy.

Per graph: the reference (validate/reference.py) and the backend run the same seeded feeds through
polygraphy's Comparator; results are saved as polygraphy RunResults; the table adds max abs, max
rel, cosine. End to end: the stitched model graph, and greedy generation by the runtime (runtime/:
prefill graphs, then decode graphs fed with the states they returned) against the reference
model's own greedy generation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen3next_trt.outputs import refuse_overlap
from qwen3next_trt.errors import InputError
from qwen3next_trt.tables import text_table
from qwen3next_trt.model.fp8 import fake_quantize_, fake_quantize_activations_, fake_quantize_kv_

from qwen3next_trt.export.manifest import read_manifest
from qwen3next_trt.runtime import Generator
from qwen3next_trt.runtime.graphs import OrtSession

from .inputs import feeds_for
from .tolerances import TOLERANCES, fp8_step_tolerance, greedy_check, kv_rounding_effect, metrics, tolerance
from .reference import (
    ReferencePart,
    ReferenceRunner,
    dequantize_kv,
    input_metadata,
    kv_scales_for,
    weight_quantizer,
    weight_source,
)

BACKENDS = ("onnxrt", "tensorrt")


@dataclass
class Row:
    backend: str
    graph: str
    feed: str
    output: str
    max_abs: float
    max_rel: float
    cosine: float
    ref_max: float
    tolerance: float  # on max_abs (already scaled for rel_to_max tolerances)
    passed: bool
    polygraphy: bool | None = None  # polygraphy Comparator's verdict on the same threshold


@dataclass
class Report:
    onnx_dir: str
    backend: str
    device: str
    dtype: str
    tolerances: dict
    rows: list[Row] = field(default_factory=list)
    end_to_end: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        # nothing compared is not a pass
        return bool(self.rows) and all(r.passed for r in self.rows) and all(v.get("passed", True) for v in self.end_to_end.values())

    def to_dict(self):
        return {**asdict(self), "passed": self.passed}


def _greedy(generator: Generator, prompt: np.ndarray, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy tokens [B, n] through the runtime, and per step the logits [B, V] each token came from."""
    tokens, logits = [[] for _ in prompt], [[] for _ in prompt]
    for ev in generator.stream(prompt.tolist(), n, keep_logits=True):
        tokens[ev.request].append(ev.token)
        logits[ev.request].append(ev.logits)
    return np.array(tokens), [np.stack([row[i] for row in logits]) for i in range(n)]


class DequantizedKV:
    """A session whose float8 key/value outputs (uint8 bits) come back as float32 values (bits x
    scale), the form the reference produces, so both are compared as numbers."""

    def __init__(self, session, output_names: list[str], scales: dict[str, float]):
        self.session, self.names, self.scales = session, output_names, scales

    def run(self, names, feed):
        outs = self.session.run(names, feed)
        return [dequantize_kv(o, self.scales[n]) if n in self.scales else o for n, o in zip(self.names, outs)]


class SessionRunner:
    """A polygraphy runner over anything with `run(None, feeds)` (here: TensorRT engine sessions)."""

    def __new__(cls, session, inputs: list[dict], outputs: list[str], name: str):
        from polygraphy.backend.base import BaseRunner

        class _Runner(BaseRunner):
            def activate_impl(self):
                pass

            def get_input_metadata_impl(self):
                return input_metadata(inputs)

            def infer_impl(self, feed_dict):
                start = time.time()
                values = session.run(None, feed_dict)
                self.inference_time = time.time() - start
                return dict(zip(outputs, values))

            def deactivate_impl(self):
                pass

        return _Runner(name=name)


class Validator:
    def __init__(self, onnx_dir: str | Path, backend: str = "onnxrt", model: str | None = None,
                 report_dir: str | Path | None = None, generate: int = 24, engines: str | Path | None = None,
                 progress=print):
        self.dir = Path(onnx_dir)
        self.manifest = read_manifest(self.dir)
        manifest_path = self.dir / "manifest.json"
        if backend not in BACKENDS:
            raise InputError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        bf16 = self.manifest.get("dtype") == "bf16"
        if backend == "onnxrt" and bf16:
            raise InputError(f"{manifest_path}: a bf16 export: ONNX Runtime's CPU provider has no bfloat16 kernels "
                             "(MatMul among them); validate fp32 or fp16 exports on CPU, bf16 ones with --backend tensorrt")
        if backend == "tensorrt" and engines is None:
            raise InputError("--backend tensorrt needs --engines DIR (the output of `qwen3next-trt build`)")
        # TensorRT is compared three ways: against the reference, and beside ONNX Runtime on the same feeds.
        self.backends = ["onnxrt"] if backend == "onnxrt" else (["tensorrt"] if bf16 else ["onnxrt", "tensorrt"])
        self.engines = Path(engines) if engines else None
        self.backend, self.model_override, self.generate = backend, model, generate
        self.notes: list[str] = []
        self.report_dir = Path(report_dir) if report_dir else self.dir / "validation"
        if report_dir and self.report_dir.resolve() != (self.dir / "validation").resolve():
            # the default folder inside the export is the one place inside an input a report may go
            refuse_overlap(self.report_dir, "--report", {"export (--onnx)": self.dir, "engines (--engines)": self.engines,
                                                         "checkpoint (--model)": model if model and Path(model).is_dir() else None})
        self.progress = progress
        self.tol = TOLERANCES[self.manifest["dtype"]]
        check_files(self.dir, self.manifest)
        self.source = weight_source(self.manifest, model)
        self.quantizer = weight_quantizer(self.manifest, self.source)
        self.act_scales = self.manifest.get("activation_precision", {}).get("scales")
        if self.act_scales or self.manifest.get("kv_cache", {}).get("format") == "float8e4m3fn":
            # rounding to FP8 can land on the other side of a tie in ONNX Runtime than in PyTorch:
            # one FP8 step (6% of that element), so the gate is relative, as the FP8 issue sets it
            self.tol = TOLERANCES["fp8_activations"]

    def run(self) -> Report:
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table reports mismatches
        t0 = time.time()
        import onnxruntime as ort

        device = f"onnxrt: cpu (onnxruntime {ort.__version__} CPUExecutionProvider)"
        if "tensorrt" in self.backends:
            device += f"; tensorrt: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
        report = Report(str(self.dir), "+".join(self.backends), device, self.manifest["dtype"], self.tol)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list[dict]] = {}
        for g in self.manifest["graphs"]:
            groups.setdefault(g["weights"], []).append(g)
        for i, (weights, records) in enumerate(groups.items(), 1):
            t = time.time()
            part = ReferencePart(records[0], self.source, self.quantizer, self.act_scales,
                                 kv_scales_for(records[0], self.manifest, self.source.config))
            for rec in records:
                report.rows += self._compare_graph(rec, part)
            worst = max((r.max_abs for r in report.rows if r.graph in {x["name"] for x in records}), default=0.0)
            self.progress(f"[validate] {i}/{len(groups)} {weights.removesuffix('.weights'):<10} "
                          f"max abs {worst:.2e}  {time.time() - t:5.1f} s")
            del part
        report.end_to_end.update(self._end_to_end(report))
        report.notes = self.notes + report.notes
        report.seconds = time.time() - t0
        self._write(report)
        return report

    def _session(self, backend: str, rec: dict):
        if backend == "onnxrt":
            return OrtSession(self.dir / rec["file"])
        from qwen3next_trt.engines.runtime import EngineSession

        path = self.engines / f"{rec['name']}.engine"
        if not path.is_file():
            raise LookupError(f"no engine {path.name} in {self.engines}")
        return EngineSession(path)

    def _compare_graph(self, rec: dict, part: ReferencePart) -> list[Row]:
        from polygraphy.backend.onnxrt import OnnxrtRunner
        from polygraphy.comparator import Comparator, CompareFunc

        feeds = feeds_for(rec, self.manifest["config"], seed=_seed(rec["name"]))
        kind = "end_to_end" if rec["kind"] == "model" else "layer"
        outputs = [o["name"] for o in rec["outputs"]]
        kv_scales = part.kv_scales
        runners = [ReferenceRunner(part, name="pytorch")]
        backends = []
        for backend in self.backends:
            if backend == "onnxrt":
                if self.backend != "onnxrt":
                    # beside TensorRT, ONNX Runtime is a second opinion: an older build without the
                    # contrib ops must not stop the TensorRT comparison
                    try:
                        OrtSession(self.dir / rec["file"])
                    except Exception as e:  # noqa: BLE001
                        self.notes.append(f"{rec['name']}: onnxrt not compared: {str(e).splitlines()[0][:160]}")
                        continue
                if kv_scales:
                    runners.append(SessionRunner(DequantizedKV(OrtSession(self.dir / rec["file"]), outputs, kv_scales),
                                                 rec["inputs"], outputs, name="onnxrt"))
                else:
                    # polygraphy's runner over the project's session (its options: runtime/graphs.py)
                    runners.append(OnnxrtRunner(OrtSession(self.dir / rec["file"]).session, name="onnxrt"))
            else:
                try:
                    runners.append(SessionRunner(DequantizedKV(self._session(backend, rec), outputs, kv_scales), rec["inputs"], outputs, name=backend))
                except LookupError as e:
                    self.notes.append(f"{rec['name']}: {backend} not compared: {e}")
                    continue
            backends.append(backend)
        results = Comparator.run(runners, data_loader=[f for _, f in feeds])
        results.save(str(self.report_dir / f"{rec['name']}.runresults.json"))
        ref_iters = results[0][1]
        # the stitched model with an FP8 KV cache: what its KV rounding does to each output (tolerances.py)
        rounding = kv_rounding_effect(part, [f for _, f in feeds], ref_iters) if kind == "end_to_end" and kv_scales else None
        rows = []
        for backend, (_, got_iters) in zip(backends, list(results)[1:]):
            atol = {}
            mine = []
            for i, ((label, _), ref_it, got_it) in enumerate(zip(feeds, ref_iters, got_iters)):
                for name in outputs:
                    max_abs, max_rel, cos, ref_max = metrics(ref_it[name], got_it[name])
                    tol = tolerance(self.tol, kind, ref_max)
                    if rounding is not None:
                        tol += 2 * rounding[i][name]
                    if name in kv_scales:  # a float8 state: rounding ties (same inputs) or upstream error flipped
                        tol = fp8_step_tolerance(ref_it[name], got_it[name], kv_scales[name],
                                                 upstream=tol if kind == "end_to_end" else 0.0)
                    atol[name] = max(atol.get(name, 0.0), tol)
                    mine.append(Row(backend, rec["name"], label, name, max_abs, max_rel, cos, ref_max, tol, max_abs <= tol))
            # polygraphy's own verdict with the same thresholds (absolute, per output)
            verdict = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=0.0, check_error_stat="max"),
                                                  comparisons=[(0, 1 + backends.index(backend))])
            for it_index, it_result in enumerate(verdict[0][("pytorch", backend)]):
                for name, out_result in it_result.items():
                    for row in mine:
                        if row.feed == feeds[it_index][0] and row.output == name:
                            row.polygraphy = bool(out_result)
            rows += mine
        return rows

    def _end_to_end(self, report: Report) -> dict:
        out = {}
        model = None
        for backend in self.backends:
            try:
                generator = Generator(self.dir, session_factory=lambda rec, b=backend: self._session(b, rec), mtp=False)
            except (LookupError, InputError) as e:
                report.notes.append(f"greedy decode through per-layer graphs not run: {e}")
                return out
            except Exception as e:  # noqa: BLE001 - see _compare_graph: ONNX Runtime beside TensorRT
                if backend != "onnxrt" or self.backend == "onnxrt":
                    raise
                report.notes.append(f"onnxrt greedy decode not run: {str(e).splitlines()[0][:160]}")
                continue
            if model is None:
                model = self.source.whole_model(with_mtp=False)
                if self.quantizer is not None:
                    fake_quantize_(model, "", self.quantizer)
                    if self.act_scales:
                        fake_quantize_activations_(model, "", self.act_scales)
                if self.manifest.get("kv_cache", {}).get("format") == "float8e4m3fn":
                    fake_quantize_kv_(model, self.manifest["kv_cache"]["scales"])
                model = model.to(torch.float32)
            rng = np.random.default_rng(1234)
            vocab = self.manifest["config"]["vocab_size"]
            prompt = rng.integers(0, vocab, (2, 20), dtype=np.int64)
            t = time.time()
            tokens, step_logits = _greedy(generator, prompt, self.generate)
            with torch.no_grad():
                expected = model.generate_greedy(torch.from_numpy(prompt), self.generate).numpy()
                # the reference's logits along the backend's own token path: per-step logits error
                ids = torch.from_numpy(np.concatenate([prompt, tokens[:, :-1]], 1))
                ref_logits = model(ids, model.new_cache(ids.shape[0]))[:, prompt.shape[1] - 1 :].numpy()  # (the cache applies an FP8 KV's rounding)
                kv_quantize, model.kv_quantize = model.kv_quantize, {}  # the same path with float K/V
                float_kv_logits = model(ids, model.new_cache(ids.shape[0]))[:, prompt.shape[1] - 1 :].numpy() if kv_quantize else None
                model.kv_quantize = kv_quantize
            got = np.stack(step_logits, 1)
            max_abs, _, cos, ref_max = metrics(ref_logits, got)
            tol = tolerance(self.tol, "end_to_end", ref_max)
            if float_kv_logits is not None:  # an FP8 KV cache: its rounding's own effect, twice (tolerances.py)
                tol += 2 * metrics(ref_logits, float_kv_logits)[0]
            check = greedy_check(tokens, expected, ref_logits, tol)
            agreement = check["token_agreement"]
            out[f"greedy_per_layer_graphs[{backend}]"] = {
                "prompt_tokens": prompt.shape[1], "generated": self.generate, "batch": prompt.shape[0],
                **check, "logits_max_abs": max_abs, "logits_cosine": cos, "tolerance": tol,
                "passed": (check["consistent"] and check["agreement_before_tie"] >= self.tol["greedy_agreement"]
                           and max_abs <= tol),
                "seconds": round(time.time() - t, 1),
            }
            self.progress(f"[validate] {backend}: greedy {self.generate} tokens through per-layer graphs: agreement {agreement:.1%} ({check['near_ties']} near-ties), "
                          f"logits max abs {max_abs:.2e} (tolerance {tol:.1e})")
        return out

    def _record_of(self, path) -> dict:
        name = Path(path).name
        return next(g for g in self.manifest["graphs"] if g["file"] == name)

    def _write(self, report: Report):
        path = self.report_dir / "report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
        os.replace(tmp, path)
        plot_errors(report, self.report_dir / "per_layer_error.png")


def check_files(onnx_dir: Path, manifest: dict):
    """Every graph and weights file the manifest names exists, and each graph's inputs and outputs
    are the ones the manifest lists (a swapped or foreign file is an error before anything runs)."""
    import onnx

    if not manifest.get("graphs"):
        raise InputError(f"{onnx_dir / 'manifest.json'}: lists no graphs")
    for g in manifest["graphs"]:
        for name in (g["file"], g["weights"]):
            if not (onnx_dir / name).is_file():
                raise InputError(f"{onnx_dir / name}: missing (named by manifest.json for graph {g['name']})")
        model = onnx.load(str(onnx_dir / g["file"]), load_external_data=False)
        have = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
        want = ([p["name"] for p in g["inputs"]], [p["name"] for p in g["outputs"]])
        if have != want:
            raise InputError(f"{onnx_dir / g['file']}: inputs/outputs {have} do not match manifest graph {g['name']} {want}")


def _seed(name: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31


def table(report: Report, worst_only: bool = True) -> str:
    rows = report.rows
    if worst_only:  # one line per graph and output: the worst feed
        best: dict[tuple, Row] = {}
        for r in rows:
            k = (r.backend, r.graph, r.output)
            if k not in best or r.max_abs / max(r.tolerance, 1e-30) > best[k].max_abs / max(best[k].tolerance, 1e-30):
                best[k] = r
        rows = list(best.values())
    head = ("backend", "graph", "output", "max abs", "max rel", "cosine", "tolerance", "pass")
    body = [(r.backend, r.graph, r.output, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.6f}", f"{r.tolerance:.1e}",
             "ok" if r.passed else "FAIL") for r in rows]
    lines = text_table(head, body, left=3)
    for name, e in report.end_to_end.items():
        lines.append(f"{name}: token agreement {e['token_agreement']:.1%} ({e.get('near_ties', 0)} near-ties, "
                     f"every token a reference greedy choice: {e.get('consistent')}), logits max abs {e['logits_max_abs']:.2e} "
                     f"(tolerance {e['tolerance']:.1e}), {'ok' if e['passed'] else 'FAIL'}")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"result: {'PASS' if report.passed else 'FAIL'}  ({len(report.rows)} comparisons, backend {report.backend}, "
                 f"{report.device}, {report.dtype}, {report.seconds:.1f} s)")
    return "\n".join(lines)


def plot_errors(report: Report, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs: dict[str, dict[str, float]] = {}
    for r in report.rows:
        group, _, mode = r.graph.partition(".")
        series = graphs.setdefault(group, {})
        key = f"{r.backend} {mode or 'any'}"
        series[key] = max(series.get(key, 0.0), r.max_abs)
    names = list(graphs)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    keys = sorted({k for series in graphs.values() for k in series})
    markers = {"prefill": "o", "decode": "s", "any": "^"}
    for key in keys:
        xs = [i for i, n in enumerate(names) if key in graphs[n]]
        ax.scatter(xs, [max(graphs[names[i]][key], 1e-9) for i in xs], marker=markers[key.split()[-1]], label=key)
    if report.tolerances["kind"] == "abs":
        ax.axhline(report.tolerances["layer"], color="red", linestyle="--", label="per-layer tolerance")
        if "model" in graphs:
            ax.axhline(report.tolerances["end_to_end"], color="purple", linestyle=":", label="whole-model tolerance")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("max abs error vs PyTorch reference\n(exact matches drawn at 1e-9)")
    ax.set_title(f"{report.backend} vs reference, {report.dtype}: per graph (worst output, worst feed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
