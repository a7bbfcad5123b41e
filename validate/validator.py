"""`qwen3next-trt validate`: every exported graph against the PyTorch reference, with polygraphy.

Per graph (compare.py): the reference (reference.py, the kind's reference in export/kinds.py) and
each backend run the same seeded feeds through polygraphy's Comparator; results are saved as
polygraphy RunResults; the table adds max abs, max rel, cosine (report.py). End to end: the stitched
model graph, and greedy generation by the runtime against the reference model's own (generation.py).
The export is read through its manifest (export/manifest.py) and its files verified before anything runs.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import torch

from qwen3next_trt.errors import InputError
from qwen3next_trt.export.manifest import GraphRecord, Manifest
from qwen3next_trt.outputs import refuse_overlap
from qwen3next_trt.runtime import Generator
from qwen3next_trt.sessions import BACKENDS, OrtSession, engine_path, open_engine, torch_dtype

from .compare import compare_graph
from .generation import greedy_parity, reference_model
from .reference import ReferencePart, weight_quantizer, weight_source
from .report import Report, write_report
from .runners import session_runner
from .tolerances import TOLERANCES, UNIT_ROUNDOFF, fp8_tolerances


class Validator:
    def __init__(self, onnx_dir: str | Path, backend: str = "onnxrt", model: str | None = None,
                 report_dir: str | Path | None = None, generate: int = 24, engines: str | Path | None = None,
                 progress=print, tf32: bool = False):
        self.dir = Path(onnx_dir)
        self.manifest = Manifest.load(self.dir)
        if backend not in BACKENDS:
            raise InputError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        bf16 = self.manifest.dtype == "bf16"
        if backend == "onnxrt" and bf16:
            raise InputError(f"{self.manifest.path}: a bf16 export: ONNX Runtime's CPU provider has no bfloat16 kernels "
                             "(MatMul among them); validate fp32 or fp16 exports on CPU, bf16 ones with --backend "
                             "onnxrt-cuda or tensorrt")
        if backend == "tensorrt" and engines is None:
            raise InputError("--backend tensorrt needs --engines DIR (the output of `qwen3next-trt build`)")
        # A GPU backend is compared three ways: against the reference, and beside ONNX Runtime's CPU
        # provider on the same feeds (which has no bfloat16 kernels).
        self.backends = ["onnxrt"] if backend == "onnxrt" else ([backend] if bf16 else ["onnxrt", backend])
        self.tf32 = tf32
        self.placement: dict[str, dict[str, list[str]]] = {}
        self.ort_rewrites: dict[str, dict] = {}  # onnxrt-cuda: FP8 graphs as the CUDA provider takes them
        self.engines = Path(engines) if engines else None
        # a group's prefill and decode sessions share its deserialised engine while both are alive
        self._loaded_engines = weakref.WeakValueDictionary()
        self.backend, self.generate = backend, generate
        self.notes: list[str] = []
        self.report_dir = Path(report_dir) if report_dir else self.dir / "validation"
        # the default folder inside the export is the one place inside an input a report may go
        inside = report_dir is None or self.report_dir.resolve() == (self.dir / "validation").resolve()
        refuse_overlap(self.report_dir, "--report", {} if inside else {
            "export (--onnx)": self.dir, "engines (--engines)": self.engines,
            "checkpoint (--model)": model if model and Path(model).is_dir() else None}, "report")
        self.progress = progress
        self.tol = TOLERANCES[self.manifest.dtype]
        self.manifest.verify(progress=progress)
        self.manifest.check_graph_io()
        self.source = weight_source(self.manifest, model)
        self.quantizer = weight_quantizer(self.manifest, self.source)
        precision = self.manifest.precision
        self.act_scales = precision.activations.scales
        if precision.activations.fp8 or precision.kv_cache.fp8:
            # rounding to FP8 can land on the other side of a tie in ONNX Runtime than in PyTorch:
            # one FP8 step (6% of that element), so the gate is relative, as the FP8 issue sets it;
            # never tighter than the export dtype's own (tolerances.fp8_tolerances)
            self.tol = fp8_tolerances(self.manifest.dtype)

    def run(self) -> Report:
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table reports mismatches
        t0 = time.time()
        import onnxruntime as ort

        device = f"onnxrt: cpu (onnxruntime {ort.__version__} CPUExecutionProvider)"
        if "onnxrt-cuda" in self.backends:
            gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible to torch"
            device += f"; onnxrt-cuda: {gpu} (onnxruntime {ort.__version__} CUDAExecutionProvider, TF32 {'on' if self.tf32 else 'off'})"
        if "tensorrt" in self.backends:
            device += f"; tensorrt: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
        report = Report(str(self.dir), "+".join(self.backends), device, self.manifest.dtype, self.tol)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        groups = self.manifest.groups()
        for i, (weights, records) in enumerate(groups.items(), 1):
            t = time.time()
            part = ReferencePart(records[0], self.source, self.quantizer, self.act_scales, self.manifest.kv_scales(records[0]),
                                 scale_dtype=torch_dtype(self.manifest.dtype))
            for rec in records:
                report.rows += compare_graph(rec, part, self._runners(rec, part.kv_scales), self.manifest.vocab_size,
                                             self.tol, self.report_dir, UNIT_ROUNDOFF.get(self.manifest.dtype))
            names = {x.name for x in records}
            worst = max((r.max_abs for r in report.rows if r.graph in names), default=0.0)
            self.progress(f"[validate] {i}/{len(groups)} {weights.removesuffix('.weights'):<10} "
                          f"max abs {worst:.2e}  {time.time() - t:5.1f} s")
            del part
        report.end_to_end.update(self._end_to_end(report))
        report.placement = {g: {ep: len(nodes) for ep, nodes in p.items()} for g, p in self.placement.items()}
        off_gpu = {g: [n for ep, nodes in p.items() if ep != "CUDAExecutionProvider" for n in nodes] for g, p in self.placement.items()}
        for g, nodes in off_gpu.items():
            if nodes:  # no silent CPU fallback: every node the CUDA provider did not take is named
                report.notes.append(f"{g}: onnxrt-cuda ran {len(nodes)} node(s) on the CPU provider: {', '.join(nodes[:6])}"
                                    + (" ..." if len(nodes) > 6 else ""))
        if self.ort_rewrites:  # what an FP8 export became on the CUDA provider (engines/fold.py onnx_for_ort_cuda)
            gemms = [r for v in self.ort_rewrites.values() for r in v.get("fp8_gemms", [])]
            done = sum(r["rewritten"] for r in gemms)
            why = sorted({r["why"] for r in gemms if not r["rewritten"]})
            folded = sum(len(v.get("dequantised", [])) for v in self.ort_rewrites.values())
            report.notes.append(f"onnxrt-cuda FP8: {done} of {len(gemms)} FP8 projection(s) in {len(self.ort_rewrites)} graph(s) ran as "
                                f"com.microsoft::MatMulBlockQuantizedFp8Weight (FP8 bytes read by the kernel)"
                                + (f"; the others not ({'; '.join(why)})" if why else "")
                                + f"; {folded} DequantizeLinear(s) of FP8 constants (experts"
                                + (", float32 projections" if why else "") + ") dequantised once into the export's .ort-cuda/ "
                                "folder: 16/32-bit in GPU memory")
        report.notes = self.notes + report.notes
        report.seconds = time.time() - t0
        write_report(report, self.report_dir)
        return report

    def _session(self, backend: str, rec: GraphRecord):
        if backend == "onnxrt":
            return OrtSession(self.dir / rec.file)
        if backend == "onnxrt-cuda":
            session = OrtSession(self.dir / rec.file, device="cuda", tf32=self.tf32)
            self.placement[rec.name] = session.placement()
            if session.rewrites:
                self.ort_rewrites[rec.name] = session.rewrites
            return session
        if not engine_path(self.engines, rec).is_file():
            raise LookupError(f"no engine {engine_path(self.engines, rec).name} in {self.engines}")
        return open_engine(self.engines, rec, self.manifest, self._loaded_engines)

    def _runners(self, rec: GraphRecord, kv_scales: dict) -> list:
        from polygraphy.backend.onnxrt import OnnxrtRunner

        runners = []
        for backend in self.backends:
            try:
                session = self._session(backend, rec)
            except LookupError as e:
                self.notes.append(f"{rec.name}: {backend} not compared: {e}")
                continue
            except Exception as e:  # noqa: BLE001
                # beside TensorRT, ONNX Runtime is a second opinion: an older build without the
                # contrib ops must not stop the TensorRT comparison
                if backend != "onnxrt" or self.backend == "onnxrt":
                    raise
                self.notes.append(f"{rec.name}: onnxrt not compared: {str(e).splitlines()[0][:160]}")
                continue
            if backend == "onnxrt" and not kv_scales:
                # polygraphy's own runner over the project's session (its options: sessions.py)
                runners.append((backend, OnnxrtRunner(session.session, name=backend)))
            else:
                runners.append((backend, session_runner(session, rec, kv_scales, backend)))
        return runners

    def _end_to_end(self, report: Report) -> dict:
        out = {}
        model = None
        for backend in self.backends:
            try:
                generator = Generator(self.dir, session_factory=lambda rec, b=backend: self._session(b, rec), mtp=False)
            except (LookupError, InputError) as e:
                report.notes.append(f"greedy decode through per-layer graphs not run: {e}")
                return out
            except Exception as e:  # noqa: BLE001 - see _runners: ONNX Runtime beside TensorRT
                if backend != "onnxrt" or self.backend == "onnxrt":
                    raise
                report.notes.append(f"onnxrt greedy decode not run: {str(e).splitlines()[0][:160]}")
                continue
            if model is None:
                model = reference_model(self.source, self.manifest, self.quantizer)
            row = greedy_parity(generator, model, self.manifest.vocab_size, self.generate, self.tol,
                                UNIT_ROUNDOFF.get(self.manifest.dtype))
            out[f"greedy_per_layer_graphs[{backend}]"] = row
            self.progress(f"[validate] {backend}: greedy {self.generate} tokens through per-layer graphs: agreement "
                          f"{row['token_agreement']:.1%} ({row['near_ties']} near-ties), "
                          f"logits max abs {row['logits_max_abs']:.2e} (tolerance {row['tolerance']:.1e})"
                          + (f"; {row.get('routing_near_tie') or row.get('excused')}" if row.get("routing_near_tie") or row.get("excused") else ""))
        return out
