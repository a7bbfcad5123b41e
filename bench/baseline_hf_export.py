#!/usr/bin/env python
"""Baseline: what plain ``torch.onnx.export`` does with transformers' own Qwen3NextForCausalLM.

Builds a small random model with the Qwen3-Next structure (3 Gated-DeltaNet layers + 1 gated full
attention layer, sparse MoE with a shared expert in every layer), eager attention, float32,
``use_cache=False``, and tries three exports of ``model(input_ids)``:

  dynamo_dynamic     torch.onnx.export(dynamo=True, opset 23) with a dynamic sequence axis
  torchscript        torch.onnx.export(dynamo=False, opset 18) with dynamic_axes on the sequence
  dynamo_static      torch.onnx.export(dynamo=True, opset 23) without dynamic shapes

Each attempt runs in its own subprocess with a wall-clock limit, so a failure, a hang or a crash in
one does not stop the others. For an export that succeeds the script records the node count
(top level and including subgraphs), the op-type histogram, Loop/Scan/If counts, file sizes, whether
ONNX Runtime (CPUExecutionProvider) loads and runs it, the max |logits - PyTorch logits| at the
export length, and, for dynamic exports, whether it runs (and matches) at a second length.

    python bench/baseline_hf_export.py [--out bench/results/baseline_hf_export.json]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

# experts=None keeps transformers' default experts implementation (config._experts_implementation,
# "grouped_mm" in transformers 5); "eager" sets experts_implementation="eager" (a Python loop over
# the experts), the switch a user would try next when the default does not export.
ATTEMPTS = {
    "dynamo_dynamic": dict(dynamo=True, opset=23, dynamic=True, experts=None),
    "torchscript": dict(dynamo=False, opset=18, dynamic=True, experts=None),
    "dynamo_static": dict(dynamo=True, opset=23, dynamic=False, experts=None),
    "dynamo_dynamic+eager_experts": dict(dynamo=True, opset=23, dynamic=True, experts="eager"),
    "torchscript+eager_experts": dict(dynamo=False, opset=18, dynamic=True, experts="eager"),
    "dynamo_static+eager_experts": dict(dynamo=True, opset=23, dynamic=False, experts="eager"),
}

CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
)

# log lines from the exporters worth keeping in the result (specialisation, guards, fallbacks)
NOTEWORTHY = re.compile(
    r"speciali[sz]|guard|constant|fallback|falling back|warn|error|unsupported|dynamic|"
    r"Dim|symbolic|data-dependent|loop|unroll|trace",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------
# worker (one attempt, in a subprocess)
# --------------------------------------------------------------------------------------------

def build_model(seed: int, experts: str | None = None):
    import torch
    import transformers

    extra = {} if experts is None else {"experts_implementation": experts}
    cfg = transformers.Qwen3NextConfig(**CONFIG, attn_implementation="eager", use_cache=False, **extra)
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(cfg).to(torch.float32).eval()
    model.config.use_cache = False
    return model, cfg


def make_ids(seq: int, seed: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, seq), generator=g, dtype=torch.int64)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_lines(text: str, n: int = 3, width: int = 400) -> str:
    lines = [ln.rstrip() for ln in ANSI.sub("", str(text)).strip().splitlines() if ln.strip()]
    return "\n".join(ln[:width] for ln in lines[:n])


def graph_stats(model_proto) -> dict:
    """Node counts, op histogram, control-flow counts; recursing into subgraphs and local functions."""
    import onnx

    hist: collections.Counter = collections.Counter()
    control = collections.Counter()

    def walk(graph):
        n = 0
        for node in graph.node:
            n += 1
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            hist[key] += 1
            if node.op_type in ("Loop", "Scan", "If") and node.domain in ("", "ai.onnx"):
                control[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        n += walk(g)
        return n

    total = walk(model_proto.graph)
    fn_nodes = 0
    for fn in model_proto.functions:
        for node in fn.node:
            fn_nodes += 1
            hist[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
    return {
        "nodes_top_level": len(model_proto.graph.node),
        "nodes_total": total + fn_nodes,
        "local_functions": len(model_proto.functions),
        "initializers": len(model_proto.graph.initializer),
        "op_types_distinct": len(hist),
        "op_histogram_top15": dict(hist.most_common(15)),
        "loop_scan_if": {k: control.get(k, 0) for k in ("Loop", "Scan", "If")},
        "ir_version": model_proto.ir_version,
        "opset_imports": {op.domain or "ai.onnx": op.version for op in model_proto.opset_import},
        "inputs": [
            {
                "name": i.name,
                "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
            }
            for i in model_proto.graph.input
        ],
        "outputs": [
            {
                "name": o.name,
                "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim],
            }
            for o in model_proto.graph.output
        ],
    }


def install_capture_hook(captured: dict) -> None:
    """Record what torch.onnx's capture step does with torch.export.export (calls, errors, program).

    The torch.onnx dynamo exporter calls ``torch.export.export`` (by attribute, at call time); this
    wrapper passes everything through unchanged and only keeps the arguments' dynamic shapes, any
    exception (e.g. the constraint violation whose "Suggested fixes" torch.onnx then applies) and
    the last ExportedProgram, so a failure in the later ONNX translation step can still report how
    the model was traced.
    """
    import torch

    orig = torch.export.export

    def wrapped(*a, **k):
        call = {"dynamic_shapes": str(k.get("dynamic_shapes")), "strict": k.get("strict")}
        captured.setdefault("calls", []).append(call)
        try:
            ep = orig(*a, **k)
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            call["error"] = f"{type(e).__name__}: {first_lines(msg, 2, 300)}"
            m = re.search(r"Suggested fixes:\s*\n((?:\s+.+\n?)+)", msg)
            if m:
                call["suggested_fixes"] = [
                    ln.strip() for ln in m.group(1).splitlines() if re.match(r"\s*\w+ = ", ln)
                ][:5]
            guards = re.findall(r"satisfy the generated guard (.+?)\.?\s*$", msg, re.MULTILINE)
            if guards:
                # the shortest guards are the readable ones (e.g. the number of 64-token chunks == 2)
                call["guards_violating_range"] = len(guards)
                call["guards_shortest"] = sorted(set(guards), key=len)[:3]
            spec = re.findall(r"resulted in a specialized value of (\d+)", msg)
            if spec:
                call["specialized_to"] = sorted(set(int(v) for v in spec))
            raise
        captured["ep"] = ep
        call["ok"] = True
        return ep

    torch.export.export = wrapped


def exported_program_stats(ep) -> dict:
    """Shape of the traced (aten-level) program: symbolic or fixed sequence axis, node counts,
    where the nodes come from (which decoder layer; the chunked gated-delta-rule function)."""
    out: dict = {}
    g = ep.graph_module.graph
    nodes = [n for n in g.nodes if n.op == "call_function"]
    out["fx_call_function_nodes"] = len(nodes)
    user_inputs = set(ep.graph_signature.user_inputs)
    shapes = {}
    for n in g.nodes:
        if n.op == "placeholder" and n.name in user_inputs:
            val = n.meta.get("val")
            shapes[n.name] = [str(d) for d in getattr(val, "shape", [])]
    out["fx_input_shapes"] = shapes
    out["fx_sequence_axis_symbolic"] = any(
        not d.isdigit() for shp in shapes.values() for d in shp[1:2]
    )
    out["fx_range_constraints"] = {str(k): str(v) for k, v in ep.range_constraints.items()}
    hist = collections.Counter(str(n.target) for n in nodes)
    out["fx_op_histogram_top15"] = dict(hist.most_common(15))
    per_layer: collections.Counter = collections.Counter()
    layer_kind: dict = {}
    in_chunk_rule = collections.Counter()
    loop_ops = collections.Counter()
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        layer = None
        for path, typ in stack.values():
            m = re.search(r"layers\.(\d+)(?:\.(\w+))?", str(path))
            if m:
                layer = int(m.group(1))
                if m.group(2) in ("linear_attn", "self_attn"):
                    layer_kind[layer] = m.group(2)
        per_layer[layer if layer is not None else "outside layers"] += 1
        trace = n.meta.get("stack_trace") or ""
        if "torch_chunk_gated_delta_rule" in trace:
            in_chunk_rule[layer] += 1
        t = str(n.target)
        if any(w in t for w in ("while_loop", "scan", "cond", "map_impl")):
            loop_ops[t] += 1
    out["fx_nodes_per_layer"] = {
        (f"layer {k} ({layer_kind.get(k, '?')})" if isinstance(k, int) else k): v
        for k, v in sorted(per_layer.items(), key=lambda kv: (not isinstance(kv[0], int), str(kv[0])))
    }
    out["fx_nodes_in_chunk_gated_delta_rule"] = int(sum(in_chunk_rule.values()))
    out["fx_nodes_in_chunk_gated_delta_rule_per_layer"] = {
        f"layer {k}": v for k, v in sorted(in_chunk_rule.items(), key=lambda kv: str(kv[0]))
    }
    out["fx_control_flow_ops"] = dict(loop_ops)  # torch.cond / while_loop / scan higher-order ops
    return out


def ort_check(model_proto, model, cfg, seq: int, alt_seq: int, seed: int, dynamic: bool) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    res: dict = {}
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def make_session(proto):
        return ort.InferenceSession(
            proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
        )

    try:
        sess = make_session(model_proto)
        res["ir_version_downgraded"] = False
    except Exception as e:  # noqa: BLE001
        if "ir_version" in str(e).lower() or "ir version" in str(e).lower():
            res["ir_version_downgraded"] = True
            res["ir_version_original"] = model_proto.ir_version
            model_proto.ir_version = 10
            try:
                sess = make_session(model_proto)
            except Exception as e2:  # noqa: BLE001
                res.update(ort_loads=False, ort_error=f"{type(e2).__name__}: {first_lines(e2)}")
                return res
        else:
            res.update(ort_loads=False, ort_error=f"{type(e).__name__}: {first_lines(e)}")
            return res
    res["ort_loads"] = True
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]

    def run_at(length: int, key: str):
        ids = make_ids(length, seed + length, cfg.vocab_size)
        with torch.no_grad():
            ref = model(ids).logits.float().numpy()
        t0 = time.perf_counter()
        try:
            outs = sess.run(None, {in_name: ids.numpy()})
        except Exception as e:  # noqa: BLE001
            res[f"{key}_runs"] = False
            res[f"{key}_error"] = f"{type(e).__name__}: {first_lines(e)}"
            return
        res[f"{key}_runs"] = True
        res[f"{key}_run_s"] = round(time.perf_counter() - t0, 4)
        # logits: the output named logits, else the first output shaped like the reference
        idx = next((i for i, n in enumerate(out_names) if "logits" in n), None)
        if idx is None:
            idx = next((i for i, o in enumerate(outs) if tuple(o.shape) == ref.shape), 0)
        got = np.asarray(outs[idx])
        res[f"{key}_output_shape"] = list(got.shape)
        if got.shape != ref.shape:
            res[f"{key}_max_abs_diff"] = None
            res[f"{key}_note"] = f"output shape {list(got.shape)} != reference {list(ref.shape)}"
            return
        res[f"{key}_max_abs_diff"] = float(np.max(np.abs(got.astype(np.float64) - ref)))
        res[f"{key}_ref_max_abs"] = float(np.max(np.abs(ref)))

    run_at(seq, "seq")
    res["seq_len"] = seq
    if dynamic:
        run_at(alt_seq, "alt_seq")
        res["alt_seq_len"] = alt_seq
    return res


def worker(name: str, workdir: str, result_path: str, seq: int, alt_seq: int, seed: int) -> None:
    import onnx
    import torch

    spec = ATTEMPTS[name]
    result: dict = {"attempt": name, **{k: v for k, v in spec.items()}}

    def dump():
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, cfg = build_model(seed, spec["experts"])
    result["experts_implementation"] = getattr(cfg, "_experts_implementation", None)
    ids = make_ids(seq, seed + seq, cfg.vocab_size)
    path = os.path.join(workdir, f"{name}.onnx")

    kwargs: dict = dict(opset_version=spec["opset"], dynamo=spec["dynamo"])
    if spec["dynamic"]:
        if spec["dynamo"]:
            seq_dim = torch.export.Dim("seq", min=2, max=4096)
            kwargs["dynamic_shapes"] = {"input_ids": {1: seq_dim}}
            result["dynamic_spec"] = "dynamic_shapes={'input_ids': {1: Dim('seq', min=2, max=4096)}}"
        else:
            kwargs["input_names"] = ["input_ids"]
            kwargs["output_names"] = ["logits"]
            kwargs["dynamic_axes"] = {"input_ids": {1: "seq"}, "logits": {1: "seq"}}
            result["dynamic_spec"] = "dynamic_axes={'input_ids': {1: 'seq'}, 'logits': {1: 'seq'}}"
    elif not spec["dynamo"]:
        kwargs["input_names"] = ["input_ids"]
        kwargs["output_names"] = ["logits"]
    if spec["dynamo"]:
        kwargs["external_data"] = False  # tiny model: one self-contained file
    result["export_kwargs"] = {k: (str(v) if k == "dynamic_shapes" else v) for k, v in kwargs.items()}
    result["stage"] = "export"
    dump()

    captured: dict = {}
    if spec["dynamo"]:
        install_capture_hook(captured)

    def record_capture():
        if not spec["dynamo"]:
            return
        result["torch_export_calls"] = captured.get("calls", [])
        if "ep" in captured:
            try:
                result["traced_program"] = exported_program_stats(captured["ep"])
            except Exception as e:  # noqa: BLE001
                result["traced_program"] = {"error": f"{type(e).__name__}: {first_lines(e, 2)}"}

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(model, (ids,), path, **kwargs)
    except Exception as e:  # noqa: BLE001
        record_capture()
        result.update(
            ok=False,
            export_s=round(time.perf_counter() - t0, 2),
            error_type=f"{type(e).__module__}.{type(e).__name__}",
            error_message=first_lines(e, n=4),
            traceback_tail="".join(traceback.format_exception(e)[-3:])[-2000:],
        )
        # the chained exceptions (outermost first); the innermost is usually the real reason
        chain, cur = [], e
        while cur is not None and len(chain) < 8:
            chain.append({"type": f"{type(cur).__module__}.{type(cur).__name__}",
                          "message": first_lines(cur, n=3)})
            cur = cur.__cause__ or cur.__context__
        result["exception_chain"] = chain
        if len(chain) > 1:
            result["root_cause_type"] = chain[-1]["type"]
            result["root_cause_message"] = chain[-1]["message"]
        dump()
        return
    result["export_s"] = round(time.perf_counter() - t0, 2)
    result["ok"] = True
    record_capture()
    result["stage"] = "analyse"
    files = sorted(p for p in os.listdir(workdir) if p.startswith(name))
    result["files"] = {p: os.path.getsize(os.path.join(workdir, p)) for p in files}
    result["file_bytes_total"] = sum(result["files"].values())
    dump()

    proto = onnx.load(path, load_external_data=True)
    result.update(graph_stats(proto))
    try:
        onnx.checker.check_model(proto, full_check=False)
        result["onnx_checker"] = "ok"
    except Exception as e:  # noqa: BLE001
        result["onnx_checker"] = f"{type(e).__name__}: {first_lines(e, 1)}"
    result["stage"] = "ort"
    dump()
    result.update(ort_check(proto, model, cfg, seq, alt_seq, seed, spec["dynamic"]))
    result["stage"] = "done"
    dump()


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def noteworthy_lines(text: str, limit: int = 25) -> list[str]:
    seen, out = set(), []
    for ln in text.splitlines():
        s = ln.strip()
        if not s or s in seen or not NOTEWORTHY.search(s):
            continue
        if s.startswith(("File ", "^", "~", "%", "return ")) or "prim::" in s or "scope:" in s:
            continue
        seen.add(s)
        out.append(s[:300])
        if len(out) >= limit:
            break
    return out


def run_attempt(name: str, args, workdir: str) -> dict:
    result_path = os.path.join(workdir, f"{name}.result.json")
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", name, "--workdir", workdir,
        "--result", result_path, "--seq", str(args.seq), "--alt-seq", str(args.alt_seq),
        "--seed", str(args.seed),
    ]
    t0 = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        rc, log = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as e:
        timed_out, rc = True, None
        log = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        log += ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
    wall = round(time.perf_counter() - t0, 2)
    res: dict = {"attempt": name, **ATTEMPTS[name]}
    if os.path.exists(result_path):
        with open(result_path) as f:
            res.update(json.load(f))
    res["wall_s"] = wall
    res["worker_rc"] = rc
    if timed_out:
        res.update(ok=False, error_type="TimeoutExpired",
                   error_message=f"attempt exceeded {args.timeout}s (stage: {res.get('stage', 'start')})")
    elif "ok" not in res:
        res.update(ok=False, error_type="WorkerCrashed",
                   error_message=f"worker exited rc={rc} at stage {res.get('stage', 'start')}: "
                                 + first_lines(log[-2000:], 3))
    elif res.get("ok") and res.get("stage") != "done":
        res["analysis_error"] = f"worker stopped at stage {res.get('stage')} (rc={rc}): " + first_lines(log[-2000:], 3)
    res["log_noteworthy"] = noteworthy_lines(log)
    if args.keep_logs:
        with open(os.path.join(args.keep_logs, f"{name}.log"), "w") as f:
            f.write(log)
    return res


def fmt_diff(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def print_table(results: list[dict]) -> None:
    cols = ["attempt", "exporter", "experts", "export", "s", "nodes", "Loop/Scan/If", "MB", "ORT", "max|dlogits|@T",
            "T'=alt"]
    rows = []
    for r in results:
        exporter = ("dynamo" if r["dynamo"] else "torchscript") + f" op{r['opset']}" + (
            " dyn" if r["dynamic"] else " static")
        experts = r.get("experts") or f"default ({r.get('experts_implementation') or '?'})"
        if not r.get("ok"):
            rows.append([r["attempt"], exporter, experts, "FAIL", f"{r.get('wall_s', 0):.0f}", "-", "-", "-", "-", "-", "-"])
            continue
        lsi = r.get("loop_scan_if", {})
        ort_s = "-"
        if "ort_loads" in r:
            ort_s = ("loads" + (" (ir->10)" if r.get("ir_version_downgraded") else "")
                     + (", runs" if r.get("seq_runs") else ", run FAILS")) if r["ort_loads"] else "load FAILS"
        if not r["dynamic"]:
            alt = "n/a"
        elif r.get("alt_seq_runs"):
            alt = f"runs, {fmt_diff(r.get('alt_seq_max_abs_diff'))}"
        elif "alt_seq_runs" in r:
            alt = "FAILS"
        else:
            alt = "-"
        rows.append([
            r["attempt"], exporter, experts, "ok", f"{r.get('export_s', 0):.0f}",
            f"{r.get('nodes_top_level', '-')}/{r.get('nodes_total', '-')}",
            "/".join(str(lsi.get(k, 0)) for k in ("Loop", "Scan", "If")),
            f"{r.get('file_bytes_total', 0) / 1e6:.2f}", ort_s, fmt_diff(r.get("seq_max_abs_diff")), alt,
        ])
    widths = [max(len(str(x)) for x in [c] + [row[i] for row in rows]) for i, c in enumerate(cols)]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print("nodes = top-level / including subgraphs and local functions")
    print("traced = the torch.export program torch.onnx built before ONNX translation (aten level):")
    for r in results:
        tp = r.get("traced_program")
        calls = r.get("torch_export_calls") or []
        if not r["dynamo"]:
            continue
        fixes = [f for c in calls for f in c.get("suggested_fixes", [])]
        line = f"  {r['attempt']}: torch.export calls {len(calls)}"
        if fixes:
            line += f", constraint violation -> torch.onnx applied suggested fix {fixes}"
        if tp and "fx_call_function_nodes" in tp:
            seq_axis = "symbolic" if tp["fx_sequence_axis_symbolic"] else "FIXED"
            line += (f"; input_ids {tp['fx_input_shapes']} (seq axis {seq_axis}); "
                     f"{tp['fx_call_function_nodes']} aten nodes, "
                     f"{tp['fx_nodes_in_chunk_gated_delta_rule']} of them in torch_chunk_gated_delta_rule; "
                     f"per layer {tp['fx_nodes_per_layer']}; control-flow ops {tp['fx_control_flow_ops'] or 0}")
        elif not calls or not any(c.get("ok") for c in calls):
            errs = [c.get("error") for c in calls if c.get("error")]
            line += f"; no program traced ({errs[-1] if errs else 'n/a'})"
        print(line)
    for r in results:
        if not r.get("ok"):
            print(f"\n[{r['attempt']}] FAILED: {r.get('error_type')}: {first_lines(r.get('error_message'), 1)}")
            if r.get("root_cause_message"):
                print(f"  root cause: {r.get('root_cause_type')}: {r.get('root_cause_message')}")
        else:
            print(f"\n[{r['attempt']}] ops top 15: {r.get('op_histogram_top15')}")
            for k in ("ort_error", "seq_error", "alt_seq_error", "alt_seq_note", "analysis_error"):
                if r.get(k):
                    print(f"  {k}: {r[k]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/baseline_hf_export.json")
    ap.add_argument("--attempts", default=",".join(ATTEMPTS), help="comma list of " + ", ".join(ATTEMPTS))
    ap.add_argument("--timeout", type=int, default=240, help="wall-clock limit per attempt, seconds")
    ap.add_argument("--seq", type=int, default=70, help="export / check sequence length")
    ap.add_argument("--alt-seq", type=int, default=33, help="second length for dynamic exports")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-onnx", default=None, help="directory to keep the exported .onnx files in")
    ap.add_argument("--keep-logs", default=None, help="directory to write each attempt's full log to")
    # internal: one attempt in a subprocess
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker(args.worker, args.workdir, args.result, args.seq, args.alt_seq, args.seed)
        return

    names = [a.strip() for a in args.attempts.split(",") if a.strip()]
    for n in names:
        if n not in ATTEMPTS:
            ap.error(f"unknown attempt {n!r}")
    if args.keep_logs:
        os.makedirs(args.keep_logs, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="baseline_hf_export_") as tmp:
        workdir = args.keep_onnx or tmp
        os.makedirs(workdir, exist_ok=True)
        for n in names:
            print(f"[{n}] exporting ...", flush=True)
            r = run_attempt(n, args, workdir)
            status = "ok" if r.get("ok") else f"FAILED ({r.get('error_type')})"
            print(f"[{n}] {status} in {r['wall_s']:.1f}s", flush=True)
            results.append(r)

    print()
    print_table(results)
    report = {
        "what": "plain torch.onnx.export of transformers' Qwen3NextForCausalLM (small random config)",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv),
        "versions": versions(),
        "cpu_count": os.cpu_count(),
        "model": {
            "class": "transformers.Qwen3NextForCausalLM",
            "config": CONFIG,
            "attn_implementation": "eager",
            "dtype": "float32",
            "use_cache": False,
            "seed": args.seed,
            "input_ids_shape": [1, args.seq],
            "alt_seq": args.alt_seq,
        },
        "timeout_per_attempt_s": args.timeout,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
