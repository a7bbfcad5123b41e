"""Run-to-run repeatability of ONNX Runtime on an export's graphs (issue 17: tiny fp16 / bf16 on the CUDA
provider were seen to give other logits on a second run), and where it comes from.

    python3 bench/device/ort_repeat.py [--device cuda] [--n 5] [--json OUT.json] EXPORT_DIR...

1. Whole graphs: every graph of the export, on validate's own seeded feeds (validate/inputs.py), run n
   times in one session and n times in a second session, with SessionOptions.use_deterministic_compute
   off and on: per output, the max abs difference to the first run of the first session (0 = bitwise
   repeatable).
2. Bisection, for each nondeterministic layer / mtp graph: the same graph with every intermediate tensor
   made a graph output, run n times; a *source* is a node whose inputs are bitwise the same in every run
   and whose outputs are not.
3. Each source node alone (a single-node graph, its captured inputs fed, weights as in the export), run
   20 times with determinism off and on. For a MoE source: per token, whether the router logits it was
   given hold an exact tie at the top-k boundary (k-th == (k+1)-th), and whether the tokens that differ
   are those; then the same node with those ties broken by one unit in the last place (the later
   expert's logit moved down), run 20 times again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ORT_TO_ONNX = {"tensor(float)": 1, "tensor(uint8)": 2, "tensor(int64)": 7, "tensor(bool)": 9, "tensor(float16)": 10,
               "tensor(bfloat16)": 16, "tensor(int32)": 6, "tensor(float8e4m3fn)": 17}


def maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    """max abs difference (0.0 when bitwise equal; inf where NaN-ness or shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    if a.dtype.kind in "fc":
        an, bn = np.isnan(a), np.isnan(b)
        if (an != bn).any():
            return float("inf")
        a, b = np.where(an, 0, a), np.where(bn, 0, b)
        return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.size else 0.0


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def runs(session, feed, n, names=None):
    return [dict(zip(names or session.output_names, session.run(names, feed))) for _ in range(n)]


def spread(ref: dict, others: list[dict]) -> dict:
    """per output: max abs difference of `others` to `ref`."""
    return {k: max(maxdiff(ref[k], o[k]) for o in others) for k in ref}


# -- 1. whole graphs --------------------------------------------------------------------------------
def whole_graphs(d: Path, manifest, device: str, n: int, only=None) -> dict:
    from qwen3next_trt.sessions import OrtSession
    from qwen3next_trt.validate.inputs import feeds_for

    out = {}
    for rec in manifest.graphs:
        if only and rec.name not in only:
            continue
        res = {}
        try:
            feeds = feeds_for(rec, manifest.vocab_size)
            for det in (False, True):
                first = None
                row = {}
                for label, feed in feeds:
                    s1 = OrtSession(d / rec.file, device=device, deterministic=det)
                    a = runs(s1, feed, n)
                    del s1
                    s2 = OrtSession(d / rec.file, device=device, deterministic=det)
                    b = runs(s2, feed, n)
                    del s2
                    row[label] = {"within_session_1": spread(a[0], a[1:]), "within_session_2": spread(b[0], b[1:]),
                                  "across_sessions": spread(a[0], b)}
                    first = first or a[0]
                res["deterministic" if det else "default"] = row
        except Exception as e:  # noqa: BLE001  (e.g. bf16 on the CPU provider: no kernel)
            res = {"error": str(e).splitlines()[0][:300]}
        out[rec.name] = res
        print(f"[repeat] {d.name} {rec.name:<18} {summary(res)}", flush=True)
    return out


def worst(row: dict) -> float:
    return max((v for feed in row.values() for part in feed.values() for v in part.values()), default=0.0)


def summary(res: dict) -> str:
    if "error" in res:
        return "error: " + res["error"][:120]
    return "  ".join(f"{k} max {worst(v):.3g}" for k, v in res.items())


# -- 2. bisection ----------------------------------------------------------------------------------
def probe_model(src: Path, dst: Path):
    """`src` with every node output a graph output (types from value_info where the exporter gave them);
    saved beside it (same folder) so its external weights resolve. Returns the onnx model."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    known = {v.name: v for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in have:
                m.graph.output.append(known[name] if name in known else onnx.ValueInfoProto(name=name))
                have.add(name)
    onnx.save(m, str(dst))
    return m


def bisect(d: Path, rec, manifest, device: str, n: int, single_ops=()) -> dict:
    from qwen3next_trt.sessions import OrtSession
    from qwen3next_trt.validate.inputs import feeds_for

    dst = d / f"_probe_{rec.name}.onnx"
    m = probe_model(d / rec.file, dst)
    consts = {i.name for i in m.graph.initializer}
    session = OrtSession(dst, device=device, deterministic=False)
    placement = {n.split(" ", 1)[1]: ep for ep, nodes in session.placement().items() for n in nodes}
    label, feed = feeds_for(rec, manifest.vocab_size)[0]
    got = runs(session, feed, n)
    sources, first_diff = [], None
    for node in m.graph.node:
        outs = [o for o in node.output if o]
        diff = {o: max(maxdiff(got[0][o], g[o]) for g in got[1:]) for o in outs}
        if not any(diff.values()):
            continue
        ins = [i for i in node.input if i and i not in consts and i not in feed]
        inputs_same = all(same(got[0][i], g[i]) for i in ins for g in got[1:])
        info = {"node": node.name, "op": f"{node.domain + '::' if node.domain else ''}{node.op_type}",
                "provider": placement.get(node.name), "inputs_same": inputs_same, "output_max_abs": diff,
                "output_frac_differing": {o: float(max((got[0][o] != g[o]).mean() for g in got[1:])) for o in outs}}
        first_diff = first_diff or info
        if inputs_same:
            sources.append(info)
    final = {o: max(maxdiff(got[0][o], g[o]) for g in got[1:]) for o in session_outputs(d / rec.file)}
    res = {"feed": label, "graph_outputs_max_abs": final, "first_differing_node": first_diff, "sources": sources,
           "single_node": []}
    picked = [info["node"] for info in sources[:4]]
    for op in single_ops:  # the first node of each op type asked for, whether or not it differed
        first = next((x.name for x in m.graph.node if x.op_type == op), None)
        if first and first not in picked:
            picked.append(first)
    for name in picked:
        node = next(x for x in m.graph.node if x.name == name)
        res["single_node"].append(single_node(d, m, node, session, got, feed, device))
    del session
    dst.unlink()
    return res


def session_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


# -- 3. single nodes -------------------------------------------------------------------------------
def single_node(d: Path, m, node, session, got: list[dict], feed: dict, device: str, reps: int = 20) -> dict:
    """`node` alone: its initializers as in the export, every other input a graph input fed what run 0
    gave it; `reps` runs each with determinism off and on."""
    import onnx
    from onnx import helper

    from qwen3next_trt.sessions import OrtSession

    inits = {i.name: i for i in m.graph.initializer}
    types = dict(session.output_types, **session.input_types)
    graph_inputs, initializers, node_feed = [], [], {}
    for name in node.input:
        if not name or name in node_feed:
            continue
        if name in inits:
            initializers.append(inits[name])
            continue
        value = got[0][name] if name in got[0] else feed[name]
        graph_inputs.append(helper.make_tensor_value_info(name, ORT_TO_ONNX[types[name]], list(value.shape)))
        node_feed[name] = value
    outputs = [helper.make_tensor_value_info(o, ORT_TO_ONNX[types[o]], None) for o in node.output if o]
    g = helper.make_graph([node], "single", graph_inputs, outputs, initializer=initializers)
    single = helper.make_model(g, opset_imports=m.opset_import, ir_version=m.ir_version)
    path = d / f"_single_{node.name}.onnx"
    onnx.save(single, str(path))
    res = {"node": node.name, "op": node.op_type, "inputs": {k: list(v.shape) for k, v in node_feed.items()}}
    try:
        for det in (False, True):
            s = OrtSession(path, device=device, deterministic=det)
            r = runs(s, node_feed, reps)
            res["deterministic" if det else "default"] = spread(r[0], r[1:])
            res[("deterministic" if det else "default") + "_vs_in_graph"] = {o: maxdiff(r[0][o], got[0][o]) for o in r[0]}
            if node.op_type == "MoE" and not det:
                res["moe"] = moe_ties(node, node_feed, r, s, reps)
            del s
    except Exception as e:  # noqa: BLE001
        res["error"] = str(e).splitlines()[0][:300]
    path.unlink()
    return res


def down_one_ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Each value moved one unit in the last place towards -inf, in its 16-bit dtype (float16 / bfloat16)."""
    import ml_dtypes

    t = np.float16 if dtype == "tensor(float16)" else ml_dtypes.bfloat16
    bits = values.astype(t).view(np.uint16).astype(np.int32)
    neg = (bits & 0x8000) != 0
    zero = (bits & 0x7FFF) == 0
    bits = np.where(zero, 0x8001, np.where(neg, bits + 1, bits - 1))
    return bits.astype(np.uint16).view(t).astype(np.float32)


def moe_ties(node, node_feed, r, session, reps) -> dict:
    """Router ties at the top-k boundary against the tokens whose MoE output differs between runs."""
    k = next(a.i for a in node.attribute if a.name == "k")
    logits_name, out_name = node.input[1], node.output[0]
    logits = node_feed[logits_name].reshape(-1, node_feed[logits_name].shape[-1]).astype(np.float32)
    outs = [x[out_name].reshape(logits.shape[0], -1).astype(np.float64) for x in r]
    per_token = np.max([np.abs(o - outs[0]).max(-1) for o in outs[1:]], axis=0)
    srt = -np.sort(-logits, -1)
    boundary_tie = srt[:, k - 1] == srt[:, k]
    any_tie_in_topk1 = np.array([len(np.unique(row[: k + 1])) < k + 1 for row in srt])
    differ = per_token > 0
    res = {"k": k, "tokens": int(logits.shape[0]), "experts": int(logits.shape[1]),
           "tokens_differing": int(differ.sum()), "boundary_ties": int(boundary_tie.sum()),
           "differing_with_boundary_tie": int((differ & boundary_tie).sum()),
           "differing_without_boundary_tie": int((differ & ~boundary_tie).sum()),
           "ties_within_top_k_plus_1": int(any_tie_in_topk1.sum()),
           "max_abs_differing_tie_tokens": float(per_token[differ & boundary_tie].max()) if (differ & boundary_tie).any() else 0.0,
           "max_abs_other_tokens": float(per_token[~boundary_tie].max()) if (~boundary_tie).any() else 0.0}
    # break each boundary tie: every expert tied with the k-th value, except the lowest-numbered one, one ulp down
    if boundary_tie.any():
        dtype = session.input_types[logits_name]
        broken = logits.copy()
        for t in np.flatnonzero(boundary_tie):
            tied = np.flatnonzero(logits[t] == srt[t, k - 1])
            broken[t, tied[1:]] = down_one_ulp(logits[t, tied[1:]], dtype)
        srt2 = -np.sort(-broken, -1)
        feed2 = dict(node_feed, **{logits_name: broken.reshape(node_feed[logits_name].shape).astype(node_feed[logits_name].dtype)})
        r2 = [dict(zip(session.output_names, session.run(None, feed2))) for _ in range(reps)]
        res["after_breaking_ties"] = {"boundary_ties_left": int((srt2[:, k - 1] == srt2[:, k]).sum()),
                                      "max_abs_between_runs": spread(r2[0], r2[1:])[out_name]}
    return res


def generate_twice(d: Path, device: str, deterministic: bool, steps: int = 32) -> dict:
    """Greedy generation through the runtime's host path (numpy between graphs, the way ort_paths.py saw
    bf16 / fp16 differ), twice on the same sessions: tokens equal? max abs logits difference along the
    shared path, and where the tokens part, the first run's top-2 margin there."""
    import os

    from qwen3next_trt.runtime import Generator
    from qwen3next_trt.sessions import ORT_DETERMINISTIC_ENV

    old = os.environ.get(ORT_DETERMINISTIC_ENV)
    os.environ[ORT_DETERMINISTIC_ENV] = "1" if deterministic else "0"
    try:
        gen = Generator(str(d), device=device)
        gen.device_resident = False
        rng = np.random.default_rng(5)
        prompts = [rng.integers(0, gen.vocab_size, n).tolist() for n in (8, 8, 13)]
        a, b = gen_run(gen, prompts, steps), gen_run(gen, prompts, steps)
    finally:
        if old is None:
            os.environ.pop(ORT_DETERMINISTIC_ENV, None)
        else:
            os.environ[ORT_DETERMINISTIC_ENV] = old
    rows = []
    for (ta, la), (tb, lb) in zip(a, b):
        diff = [i for i, (x, y) in enumerate(zip(ta, tb)) if x != y]
        upto = diff[0] + 1 if diff else len(ta)
        top2 = np.sort(la[diff[0]])[-2:] if diff else None
        rows.append({"first_difference": diff[0] if diff else None, "logits_max_abs": float(np.abs(la[:upto] - lb[:upto]).max()),
                     "top2_margin_there": float(top2[1] - top2[0]) if diff else None})
    return {"tokens_equal": all(r["first_difference"] is None for r in rows), "rows": rows}


def gen_run(gen, prompts, n):
    tokens, logits = [[] for _ in prompts], [[] for _ in prompts]
    for ev in gen.stream(prompts, n, keep_logits=True):
        tokens[ev.request].append(ev.token)
        logits[ev.request].append(ev.logits)
    return [(t, np.stack(x)) for t, x in zip(tokens, logits)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma-separated graph names (default: all)")
    ap.add_argument("--single-ops", default="", help="comma-separated op types: the first such node of each bisected "
                    "graph is also repeated alone (e.g. MoE,LinearAttention,CausalConvWithState,Attention,MatMul)")
    ap.add_argument("--generate", action="store_true", help="also greedy generation (host path) twice per setting")
    ap.add_argument("--bisect", default="auto", choices=("auto", "all", "none"),
                    help="auto: the layer / mtp graphs found nondeterministic; all: every layer / mtp graph")
    a = ap.parse_args()
    if a.device == "cuda":
        import torch  # noqa: F401  (the CUDA provider's libraries)
    from qwen3next_trt.export.manifest import Manifest

    only = set(a.only.split(",")) if a.only else None
    result = {}
    for d in map(Path, a.dirs):
        t = time.time()
        manifest = Manifest.load(d)
        whole = whole_graphs(d, manifest, a.device, a.n, only)
        bis, kinds = {}, set()
        # auto: one graph of each kind, a nondeterministic one where there is one (else the first: its nodes are
        # still repeated alone)
        order = sorted(manifest.graphs, key=lambda r: worst(whole.get(r.name, {}).get("default", {})) == 0)
        for rec in order:
            if (only and rec.name not in only) or not (rec.name.startswith("layer_") or rec.name.startswith("mtp")):
                continue
            row = whole.get(rec.name, {})
            if "error" in row or a.bisect == "none":
                continue
            kind = (rec.name.split(".")[0] if rec.name.startswith("mtp") else rec.layer_type, rec.mode)
            if a.bisect == "auto" and kind in kinds:  # one graph of each kind (DeltaNet / attention / mtp, prefill / decode)
                continue
            kinds.add(kind)
            try:
                bis[rec.name] = b = bisect(d, rec, manifest, a.device, a.n, [x for x in a.single_ops.split(",") if x])
            except Exception as e:  # noqa: BLE001
                bis[rec.name] = b = {"error": str(e).splitlines()[0][:300]}
            print(f"[bisect] {d.name} {rec.name}: " + json.dumps(
                {k: b.get(k) for k in ("graph_outputs_max_abs", "sources", "error") if k in b}), flush=True)
            for s in b.get("single_node", []):
                print(f"[single] {d.name} {rec.name} {json.dumps(s)}", flush=True)
        result[str(d)] = {"dtype": manifest.dtype, "whole": whole, "bisect": bis, "seconds": time.time() - t}
        if a.generate:
            result[str(d)]["generate"] = {s: generate_twice(d, a.device, s == "deterministic") for s in ("default", "deterministic")}
            print(f"[generate] {d.name} {json.dumps(result[str(d)]['generate'])}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    # verdict per export: is the default / deterministic setting bitwise repeatable on every graph?
    for d, r in result.items():
        errors = [g for g, v in r["whole"].items() if "error" in v]
        for setting in ("default", "deterministic"):
            bad = {g: worst(v[setting]) for g, v in r["whole"].items() if setting in v and worst(v[setting]) > 0}
            print(f"[verdict] {d} {setting}: {'repeatable' if not bad else 'NOT repeatable: ' + json.dumps(bad)}"
                  + (f" ({len(errors)} graphs did not run)" if errors else ""))
        for setting, g in r.get("generate", {}).items():
            print(f"[verdict] {d} generate twice, {setting}: {json.dumps(g)}")


if __name__ == "__main__":
    sys.exit(main())
