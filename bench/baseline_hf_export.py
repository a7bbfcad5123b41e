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

ATTEMPTS = {
    "dynamo_dynamic": dict(dynamo=True, opset=23, dynamic=True),
    "torchscript": dict(dynamo=False, opset=18, dynamic=True),
    "dynamo_static": dict(dynamo=True, opset=23, dynamic=False),
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

def build_model(seed: int):
    import torch
    import transformers

    cfg = transformers.Qwen3NextConfig(**CONFIG, attn_implementation="eager", use_cache=False)
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(cfg).to(torch.float32).eval()
    model.config.use_cache = False
    return model, cfg


def make_ids(seq: int, seed: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, seq), generator=g, dtype=torch.int64)


def first_lines(text: str, n: int = 3, width: int = 400) -> str:
    lines = [ln.rstrip() for ln in str(text).strip().splitlines() if ln.strip()]
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
    model, cfg = build_model(seed)
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

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(model, (ids,), path, **kwargs)
    except Exception as e:  # noqa: BLE001
        result.update(
            ok=False,
            export_s=round(time.perf_counter() - t0, 2),
            error_type=f"{type(e).__module__}.{type(e).__name__}",
            error_message=first_lines(e, n=4),
            traceback_tail="".join(traceback.format_exception(e)[-3:])[-2000:],
        )
        # the root cause of a chained exception is often more telling
        cause = e.__cause__ or e.__context__
        if cause is not None:
            result["cause_type"] = f"{type(cause).__module__}.{type(cause).__name__}"
            result["cause_message"] = first_lines(cause, n=4)
        dump()
        return
    result["export_s"] = round(time.perf_counter() - t0, 2)
    result["ok"] = True
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
        if s.startswith(("File ", "^", "~")):
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
    cols = ["attempt", "exporter", "export", "s", "nodes", "Loop/Scan/If", "MB", "ORT", "max|dlogits|@T",
            "T'=alt"]
    rows = []
    for r in results:
        exporter = ("dynamo" if r["dynamo"] else "torchscript") + f" op{r['opset']}" + (
            " dyn" if r["dynamic"] else " static")
        if not r.get("ok"):
            rows.append([r["attempt"], exporter, "FAIL", f"{r.get('wall_s', 0):.0f}", "-", "-", "-", "-", "-", "-"])
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
            r["attempt"], exporter, "ok", f"{r.get('export_s', 0):.0f}",
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
    for r in results:
        if not r.get("ok"):
            print(f"\n[{r['attempt']}] FAILED: {r.get('error_type')}: {r.get('error_message')}")
            if r.get("cause_message"):
                print(f"  cause: {r.get('cause_type')}: {r.get('cause_message')}")
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
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
