"""One graph against the reference: polygraphy's Comparator over the reference and the backends'
runners on the graph's seeded feeds, the RunResults saved, every output measured and gated by the
tolerances (tolerances.py), with polygraphy's own verdict on the same thresholds beside ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3next_trt.export.manifest import GraphRecord, Kind, Role

from .inputs import feeds_for
from .reference import ReferencePart
from .report import Row
from .runners import reference_runner
from .tolerances import activation_rounding_effect, fp8_step_tolerance, kv_rounding_effect, metrics, tolerance


def compare_graph(record: GraphRecord, part: ReferencePart, runners: list, vocab_size: int, tol: dict,
                  report_dir: Path, unit_roundoff: float | None = None) -> list[Row]:
    """runners: [(backend name, polygraphy runner)] over this graph; rows for each backend, feed and output.
    unit_roundoff (16-bit exports): tokens at a top-k routing near-tie are left out of a layer's hidden
    output, and a stitched model with one is excused (tolerances.routing_near_ties)."""
    from polygraphy.comparator import Comparator, CompareFunc

    feeds = feeds_for(record, vocab_size)
    kind = "end_to_end" if record.kind == Kind.MODEL else "layer"
    outputs = record.output_names
    kv_scales = part.kv_scales
    backends = [b for b, _ in runners]
    results = Comparator.run([reference_runner(part)] + [r for _, r in runners], data_loader=[f for _, f in feeds])
    results.save(str(report_dir / f"{record.name}.runresults.json"))
    ref_iters = results[0][1]
    # the stitched model with an FP8 KV cache: what its KV rounding does to each output (tolerances.py)
    rounding = kv_rounding_effect(part, [f for _, f in feeds], ref_iters) if kind == "end_to_end" and kv_scales else None
    # a 16-bit export with FP8 activations: roundings decided the other way (tolerances.py)
    flips = activation_rounding_effect(part, [f for _, f in feeds], ref_iters) if unit_roundoff and part.rounds_activations else None
    ties = [part.routing_ties(f, unit_roundoff) if unit_roundoff else [] for _, f in feeds]
    tied_tokens = [np.asarray(sum(t.numpy().astype(bool) for t in per_feed)) if per_feed else None for per_feed in ties]
    activations = {p.name for p in record.outputs if p.role == Role.ACTIVATION}
    rows = []
    for backend, (_, got_iters) in zip(backends, list(results)[1:]):
        atol = {}
        mine = []
        for i, ((label, _), ref_it, got_it) in enumerate(zip(feeds, ref_iters, got_iters)):
            tied, excused, left_out = tied_tokens[i], None, 0
            if tied is not None and tied.any() and kind == "end_to_end":
                excused = (f"{record.name}, {label}: {int(tied.sum())} routing near-tie(s) among the layers' tokens; "
                           "past one, a token's MoE output may differ by a whole expert and so may everything after it")
            for name in outputs:
                ref_out, got_out = ref_it[name], got_it[name]
                if tied is not None and tied.any() and name in activations and kind != "end_to_end":
                    keep = ~tied.astype(bool)
                    if ref_out.reshape(-1, ref_out.shape[-1]).shape[0] == keep.size:  # [B, T, H]: a row per token
                        ref_out = ref_out.reshape(-1, ref_out.shape[-1])[keep]
                        got_out = np.asarray(got_out).reshape(-1, ref_out.shape[-1])[keep]
                        left_out = int((~keep).sum())
                max_abs, max_rel, cos, ref_max = metrics(ref_out, got_out)
                t = tolerance(tol, kind, ref_max)
                if rounding is not None:
                    t += 2 * rounding[i][name]
                if flips is not None:
                    t += 2 * flips[i][name]
                if name in kv_scales:  # a float8 state: rounding ties (same inputs) or upstream error flipped
                    t = fp8_step_tolerance(ref_it[name], got_it[name], kv_scales[name],
                                           upstream=t if kind == "end_to_end" or flips is not None else 0.0)
                atol[name] = max(atol.get(name, 0.0), t)
                mine.append(Row(backend, record.name, label, name, max_abs, max_rel, cos, ref_max, t, max_abs <= t,
                                left_out=left_out if name in activations else 0, excused=excused))
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
