"""The validator's results as data (Row, Report), their table, the JSON report and the error plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen3next_trt.outputs import write_file
from qwen3next_trt.tables import text_table


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
    polygraphy: bool | None = None  # polygraphy Comparator's verdict on the same threshold (all tokens)
    left_out: int = 0  # tokens at a routing near-tie, left out of max_abs (16-bit exports; tolerances.py)
    excused: str | None = None  # why this comparison cannot decide (a routing near-tie upstream), if so


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
    placement: dict = field(default_factory=dict)  # onnxrt-cuda: {graph: {provider: nodes}}

    @property
    def passed(self) -> bool:
        # nothing compared is not a pass
        return (bool(self.rows) and all(r.passed or r.excused for r in self.rows)
                and all(v.get("passed", True) or v.get("excused") for v in self.end_to_end.values()))

    def to_dict(self):
        return {**asdict(self), "passed": self.passed}


def write_report(report: Report, report_dir: Path):
    write_file(report_dir / "report.json", json.dumps(report.to_dict(), indent=2))
    plot_errors(report, report_dir / "per_layer_error.png")


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
    verdict = lambda r: ("ok" if r.passed else "excused" if r.excused else "FAIL") + (f" ({r.left_out} tok. left out)" if r.left_out else "")  # noqa: E731
    body = [(r.backend, r.graph, r.output, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.6f}", f"{r.tolerance:.1e}",
             verdict(r)) for r in rows]
    lines = text_table(head, body, left=3)
    for name, e in report.end_to_end.items():
        lines.append(f"{name}: token agreement {e['token_agreement']:.1%} ({e.get('near_ties', 0)} near-ties, "
                     f"every token a reference greedy choice: {e.get('consistent')}), logits max abs {e['logits_max_abs']:.2e} "
                     f"(tolerance {e['tolerance']:.1e}), {'ok' if e['passed'] else 'excused: ' + e['excused'] if e.get('excused') else 'FAIL'}")
    excused = sorted({r.excused for r in report.rows if r.excused and not r.passed})
    lines += [f"excused: {e}" for e in excused]
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
