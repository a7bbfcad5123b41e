"""`qwen3next-trt quality`: what FP8 costs. An FP8 export run by ONNX Runtime against the unquantised
PyTorch reference (the model before its weights were rounded to FP8), on the same inputs.

Per graph: cosine, max abs, relative Frobenius error of every output. At the logits (end to end,
through the per-layer graphs): KL divergence of the next-token distributions, top-1 agreement,
top-5 overlap. The validator's parity gate is the other question (FP8 graphs vs the fake-quantised
reference: did the export compute what it should); this one asks how far FP8 moves the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen3next_trt.errors import InputError
from qwen3next_trt.outputs import refuse_overlap
from qwen3next_trt.tables import text_table

from qwen3next_trt.export.manifest import Manifest
from qwen3next_trt.runtime import GraphModel
from qwen3next_trt.sessions import OrtSession, onnxrt_factory

from .inputs import feeds_for
from .reference import ReferencePart, weight_source
from .tolerances import metrics


@dataclass
class QualityRow:
    graph: str
    output: str
    cosine: float
    max_abs: float
    rel_frobenius: float


@dataclass
class QualityReport:
    onnx_dir: str
    weights_precision: dict
    rows: list[QualityRow] = field(default_factory=list)
    logits: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def rel_frobenius(ref: np.ndarray, got: np.ndarray) -> float:
    r, g = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))


def logit_metrics(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """KL(ref || q) of the softmax distributions, top-1 agreement, mean top-5 overlap; inputs [N, V]."""
    r = torch.from_numpy(ref_logits).double().log_softmax(-1)
    q = torch.from_numpy(logits).double().log_softmax(-1)
    kl = (r.exp() * (r - q)).sum(-1)
    top5_r, top5_q = r.topk(5, -1).indices, q.topk(5, -1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5_r, top5_q)])
    return {"positions": int(r.shape[0]), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((r.argmax(-1) == q.argmax(-1)).double().mean()), "top5_overlap": float(overlap.mean())}


class QualityCheck:
    def __init__(self, onnx_dir: str | Path, model: str | None = None, report_dir: str | Path | None = None,
                 tokens: int = 128, progress=print):
        self.dir = Path(onnx_dir)
        self.manifest = Manifest.load(self.dir)
        path = self.manifest.path
        if not self.manifest.precision.weights.fp8:
            raise InputError(f"{path}: not an FP8 export (field 'weights_precision'): export with --precision fp8")
        if self.manifest.dtype == "bf16":
            raise InputError(f"{path}: a bf16 export cannot run on ONNX Runtime's CPU provider; export FP8 with --dtype fp32")
        self.manifest.verify(progress=progress)
        self.manifest.check_graph_io()
        self.source = weight_source(self.manifest, model)  # unquantised weights: the BF16/float model
        self.report_dir = Path(report_dir) if report_dir else self.dir / "quality"
        inside = report_dir is None or self.report_dir.resolve() == (self.dir / "quality").resolve()
        refuse_overlap(self.report_dir, "--report", {} if inside else {
            "export (--onnx)": self.dir, "checkpoint (--model)": model if model and Path(model).is_dir() else None}, "report")
        self.tokens, self.progress = tokens, progress

    def run(self) -> QualityReport:
        weights = self.manifest.precision.weights
        report = QualityReport(str(self.dir), {"format": weights.format, "scheme": weights.scheme, "source": weights.source})
        t0 = time.time()
        for records in self.manifest.groups().values():
            # no fake quantisation: the float model (an FP8 KV cache's float8 inputs are still read as such)
            part = ReferencePart(records[0], self.source, kv_scales=self.manifest.kv_scales(records[0]), fake_quantize_kv=False)
            for rec in records:
                session = OrtSession(self.dir / rec.file)
                for label, feed in feeds_for(rec, self.manifest.vocab_size)[:1]:
                    ref = part(feed)
                    got = dict(zip(ref, session.run(None, feed)))
                    for name in ref:
                        _, _, cos, _ = metrics(ref[name], got[name])
                        max_abs = float(np.abs(ref[name].astype(np.float64) - got[name]).max())
                        report.rows.append(QualityRow(rec.name, name, cos, max_abs, rel_frobenius(ref[name], got[name])))
            names = {x.name for x in records}
            self.progress(f"[quality] {records[0].weights.removesuffix('.weights'):<10} worst rel. Frobenius "
                          f"{max(r.rel_frobenius for r in report.rows if r.graph in names):.2e}")
        try:
            graphs = GraphModel(self.dir, onnxrt_factory(self.dir), self.manifest, mtp=False)
        except InputError as e:
            report.notes.append(f"logit metrics not computed: {e}")
        else:
            model = self.source.whole_model(with_mtp=False).to(torch.float32)
            rng = np.random.default_rng(4321)
            ids = rng.integers(0, self.manifest.vocab_size, (2, self.tokens), dtype=np.int64)
            logits = graphs.prefill_logits(ids)
            with torch.no_grad():
                ref = model(torch.from_numpy(ids)).numpy()
            V = ref.shape[-1]
            report.logits = logit_metrics(ref.reshape(-1, V), logits.reshape(-1, V))
            report.logits["tokens"] = "seeded random ids (a trained model and held-out text give meaningful numbers)"
        self._write(report)
        self.progress(f"[quality] done in {time.time() - t0:.1f} s")
        return report

    def _write(self, report: QualityReport):
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / "quality.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(report), indent=2))
        os.replace(tmp, path)
        plot_quality(report, self.report_dir / "quality.png")


def table(report: QualityReport) -> str:
    head = ("graph", "output", "cosine", "rel Frobenius", "max abs")
    body = [(r.graph, r.output, f"{r.cosine:.6f}", f"{r.rel_frobenius:.2e}", f"{r.max_abs:.2e}") for r in report.rows]
    lines = [f"FP8 weights ({report.weights_precision.get('scheme')}, {report.weights_precision.get('source')}) "
             "vs the unquantised reference, ONNX Runtime CPU:", *text_table(head, body, left=2)]
    if report.logits:
        m = report.logits
        lines.append(f"logits over {m['positions']} positions: KL mean {m['kl_mean']:.2e} (max {m['kl_max']:.2e}), "
                     f"top-1 agreement {m['top1_agreement']:.1%}, top-5 overlap {m['top5_overlap']:.1%}  [{m['tokens']}]")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def plot_quality(report: QualityReport, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst: dict[str, float] = {}
    for r in report.rows:
        worst[r.graph] = max(worst.get(r.graph, 0.0), r.rel_frobenius)
    names = list(worst)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    ax.bar(range(len(names)), [max(worst[n], 1e-9) for n in names])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relative Frobenius error (worst output)")
    ax.set_title("FP8 export vs unquantised reference, per graph")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
