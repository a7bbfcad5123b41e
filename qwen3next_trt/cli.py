"""The `qwen3next-trt` command.

Bad input ends with one line naming the file and field or tensor, exit code 2 (`--debug` shows the
traceback); a parity check over tolerance exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import signal
import sys
import tempfile
import threading
from pathlib import Path

from qwen3next_trt.errors import InputError, Interrupted, NumericalError, ToleranceError
from qwen3next_trt.outputs import output_file, write_file
from qwen3next_trt.sessions import BACKENDS, EXPORT_DTYPES, torch_dtype


# -- flag values, checked where they are parsed ----------------------------------------------------
# argparse names the flag in its message; `_OneLineParser.error` turns that into the project's one line.

def _int_at_least(lo: int, what: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}{what}, got {text!r}")
        return value
    return parse


def _int_range(lo: int, hi: int, what: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number {lo}..{hi}{what}, got {text!r}")
        return value
    return parse


def _float_at_least(lo: float, what: str = ""):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= lo):
            raise argparse.ArgumentTypeError(f"expected a finite number >= {lo:g}{what}, got {text!r}")
        return value
    return parse


def _spec(text: str) -> str:
    """A selection such as --layers / --graphs: an empty one used to mean 'all', silently."""
    if not text.strip().strip(","):
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma list, got {text!r} (empty)")
    return text


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse's own wording ("argument --x: ...") after the usage block would be two lines or more
        flag, sep, rest = message.partition(": ")
        if sep and flag.startswith("argument "):
            message = f"{flag[len('argument '):].split('/')[0]}: {rest}"
        self.exit(2, f"error: {message}\n")


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def cmd_info(args) -> int:
    from qwen3next_trt.model import resolve_config
    from qwen3next_trt.model.stats import model_stats, state_bytes_per_token_and_sequence

    cfg = resolve_config(args.model)
    st = model_stats(cfg)
    n_full = len(cfg.full_attention_layers)
    n_lin = len(cfg.linear_attention_layers)
    n_moe = sum(1 for _, _, m in st.layer_plan if m == "moe")
    rope = cfg.rope
    per_token, per_seq = state_bytes_per_token_and_sequence(cfg)
    print(f"model: {args.model}  ({cfg.source})")
    print(f"layers: {cfg.num_hidden_layers} ({n_lin} linear attention / Gated DeltaNet, {n_full} full attention); "
          f"{n_moe} MoE, {cfg.num_hidden_layers - n_moe} dense; MTP layers: {cfg.num_mtp_layers}")
    print(f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, rms_norm_eps {cfg.rms_norm_eps:g}, "
          f"tie_word_embeddings {cfg.tie_word_embeddings}, max positions {cfg.max_position_embeddings}")
    print(f"gated attention: {cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads x {cfg.head_dim}, "
          f"RoPE {rope.rope_type} theta {rope.rope_theta:g} on {cfg.rotary_dim} of {cfg.head_dim} dims")
    print(f"Gated DeltaNet: {cfg.linear_num_key_heads} key / {cfg.linear_num_value_heads} value heads, "
          f"dims {cfg.linear_key_head_dim}/{cfg.linear_value_head_dim}, conv width {cfg.linear_conv_kernel_dim}")
    if cfg.num_experts:
        print(f"MoE: {cfg.num_experts} experts, top-{cfg.num_experts_per_tok} (renormalised: {cfg.norm_topk_prob}), "
              f"expert width {cfg.moe_intermediate_size}, shared expert width {cfg.shared_expert_intermediate_size}")
    print()
    print(f"{'':28}{'total':>12}{'active/token':>14}")
    print(f"{'main model':28}{_params(st.main.total):>12}{_params(st.main.active):>14}")
    print(f"{'  of which embed + lm_head':28}{_params(st.embeddings):>12}{_params(st.embeddings):>14}")
    print(f"{'  without embed + lm_head':28}{_params(st.main.total - st.embeddings):>12}{_params(st.main.active - st.embeddings):>14}")
    if st.mtp.total:
        print(f"{'MTP head':28}{_params(st.mtp.total):>12}{_params(st.mtp.active):>14}")
    print()
    print(f"weights, main model: BF16 {_gib(st.bf16_bytes)}; FP8 (128x128 blocks, official BF16 modules kept) "
          f"{_gib(st.main.fp8_bytes)}; MTP adds {_gib(2 * st.mtp.total)} / {_gib(st.mtp.fp8_bytes)}")
    print(f"state per sequence: KV cache {_gib(per_token)} per token (BF16), "
          f"DeltaNet conv + recurrent state {_gib(per_seq)} (fixed)")
    print()
    print("layer plan:")
    plan = [f"{i:>3} {'linear' if t == 'linear_attention' else 'FULL  '} {m}" for i, t, m in st.layer_plan]
    cols = 4
    for r in range(0, len(plan), cols):
        print("  " + "   ".join(f"{p:<18}" for p in plan[r : r + cols]).rstrip())
    return 0


def _checkpoint_for(model: str, work: Path) -> Path:
    """A checkpoint directory; for a preset, a seeded random checkpoint written under `work`."""
    from qwen3next_trt.model import PRESETS, load_preset, random_model, save_model

    if model not in PRESETS:
        return Path(model)
    if model != "tiny":
        raise InputError(f"--model {model}: parity needs a checkpoint directory (only the 'tiny' preset is generated)")
    print(f"writing a seeded random '{model}' checkpoint to {work / model}")
    return save_model(random_model(load_preset(model), seed=0), work / model, max_shard_bytes=2**21)


def cmd_parity(args) -> int:
    from qwen3next_trt.validate.hf_parity import run_parity

    with tempfile.TemporaryDirectory(prefix="qwen3next-parity-") as tmp:
        path = _checkpoint_for(args.model, Path(tmp))
        report = run_parity(path, tokens=args.tokens, batch=args.batch, generate=args.generate, atol=args.atol,
                            progress=lambda m: print(f"[parity] {m}", flush=True))
    print()
    print(report.table())
    if args.json:
        write_file(args.json, json.dumps(report.to_dict(), indent=2))
    if not report.passed:
        raise ToleranceError("parity failed: see the table above")
    return 0


def cmd_random_checkpoint(args) -> int:
    from qwen3next_trt.model import random_model, resolve_config, save_model

    from qwen3next_trt.outputs import refuse_overlap

    cfg = resolve_config(args.model)
    src = Path(args.model)
    if src.is_dir() and any(src.glob("*.safetensors")):
        # a folder with only a config.json may receive its weights; one with weights must not lose them
        refuse_overlap(args.out, "--out", {"checkpoint (--model)": src})
    dtype = torch_dtype(args.dtype)
    out = save_model(random_model(cfg, seed=args.seed, dtype=dtype), args.out, max_shard_bytes=args.shard_mb * 2**20)
    print(f"wrote {out} ({args.model}, seed {args.seed}, {args.dtype})")
    return 0


def cmd_export(args) -> int:
    from qwen3next_trt.export.exporter import Exporter, summary_table

    manifest = Exporter(args.model, args.out, dtype=args.dtype, layers=args.layers, max_positions=args.max_positions,
                        seed=args.seed, force=args.force, precision=args.precision, fp8_scheme=args.fp8_weights,
                        activations=args.activations, calib=args.calib, calib_percentile=args.calib_percentile, kv_cache=args.kv_cache,
                        device=args.device, calib_file=args.calib_file, progress=lambda m: print(m, flush=True)).run()
    print()
    print(summary_table(manifest))
    calib = manifest.precision.activations.calibration or manifest.precision.kv_cache.calibration
    where = f"; calibration on {calib['device']}" if calib else ""
    print(f"wrote {args.out}/manifest.json (backend: torch.onnx dynamo exporter, device cpu{where})")
    return 0


def cmd_calibrate(args) -> int:
    import time

    from qwen3next_trt.export.exporter import parse_selection
    from qwen3next_trt.model.calibration import (
        CalibrationFile, calibrate, calibration_device, calibration_settings, calibration_tokens, describe_device)
    from qwen3next_trt.model.loader import WeightSource

    import torch

    if args.calib < 1:
        raise InputError(f"--calib {args.calib}: expected at least 1 sequence")
    if args.calib_percentile is not None and not 50 < args.calib_percentile <= 100:
        raise InputError(f"--calib-percentile {args.calib_percentile}: expected a percentile in (50, 100]")
    device = calibration_device(args.device)
    on_cpu = device.type == "cpu"
    source = WeightSource(args.model, seed=args.seed, dtype=torch.float32 if on_cpu else torch.bfloat16, device=device,
                          draw="cpu" if on_cpu or args.draw == "cpu" else "device")
    cfg = source.config
    sel = parse_selection(args.layers, cfg.num_hidden_layers, cfg.num_mtp_layers > 0, small=True)
    if args.layers not in (None, "", "all") and (sel.embed or sel.final or sel.model):
        raise InputError(f"--layers {args.layers!r}: calibration covers decoder layers and mtp only (embed/final/model have no FP8 activations)")
    layers = sel.layers
    store = CalibrationFile(args.out, calibration_settings(source, args.calib, 256, args.calib_percentile))
    print(f"[calibrate] {args.model} ({source.describe()}) on {describe_device(device)}; "
          f"{args.calib} x 256 tokens of Python stdlib text -> {args.out}", flush=True)
    timings: dict = {}
    t0 = time.perf_counter()
    scales = calibrate(source, calibration_tokens(args.calib, 256, cfg.vocab_size), args.calib_percentile,
                       lambda m: print(m, flush=True), layers=layers, mtp=sel.mtp, store=store, timings=timings)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(f"wrote {args.out}: {len(scales)} scales for {len(layers)} layer(s){' + MTP' if sel.mtp else ''}, "
          f"{len(timings)} run now in {total:.1f} s (backend: PyTorch {torch.__version__}, device {describe_device(device)}"
          + (f", peak GPU memory {peak / 2**30:.1f} GiB)" if peak is not None else ")"))
    if args.times:
        write_file(args.times, json.dumps({"seconds_total": round(total, 2), "device": describe_device(device),
                                                "torch": torch.__version__, "peak_gpu_memory_bytes": peak,
                                                "source": source.describe(), "layers": timings}, indent=1))
    return 0


def cmd_validate(args) -> int:
    from qwen3next_trt.validate.report import table
    from qwen3next_trt.validate.validator import Validator

    report = Validator(args.onnx, backend=args.backend, model=args.model, report_dir=args.report,
                       generate=args.generate, engines=args.engines, progress=lambda m: print(m, flush=True), tf32=args.tf32).run()
    print()
    print(table(report))
    out = Path(args.report) if args.report else Path(args.onnx) / "validation"
    print(f"wrote {out / 'report.json'}, {out / 'per_layer_error.png'} and polygraphy RunResults per graph")
    if not report.passed:
        raise ToleranceError("validation failed: see the table above")
    return 0


def cmd_build(args) -> int:
    from qwen3next_trt.engines.builder import EngineBuilder, Limits

    ccs = [c.strip().upper() for c in args.compute_capability.split(",")] if args.compute_capability else None
    builder = EngineBuilder(args.onnx, args.out, graphs=args.graphs,
                            limits=Limits(args.max_batch, args.max_seq, args.max_context),
                            optimization_level=args.opt_level, flavour=args.trt, compute_capabilities=ccs,
                            force=args.force, progress=lambda m: print(m, flush=True), embed_plugins=args.embed_plugins)
    metas = builder.run()
    served = sum(len(m["graphs"]) for m in metas)
    print(f"{len(metas)} engines + metadata in {args.out} serving {served} graphs, one engine per weights group "
          f"(timing cache {args.out}/timing.cache)")
    return 0


def cmd_plugin_library(args) -> int:
    from qwen3next_trt.plugins import build

    try:
        info = build.cpp_library_info(progress=lambda m: print(m, file=sys.stderr, flush=True))
    except build.PluginHeadersError as e:
        raise InputError(str(e)) from None
    except build.PluginBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(info["path"])
    print(f"sha256 {info['sha256']}")
    print(f"built with TensorRT {info['tensorrt_headers_version']} headers from {info['headers_from']}: {info['headers']}")
    return 0


def cmd_inspect(args) -> int:
    from qwen3next_trt.engines.builder import inspect_path

    print(inspect_path(args.path))
    return 0


def cmd_quality(args) -> int:
    from qwen3next_trt.validate.quality import QualityCheck, table

    report = QualityCheck(args.onnx, model=args.model, report_dir=args.report, tokens=args.tokens,
                          progress=lambda m: print(m, flush=True)).run()
    print()
    print(table(report))
    out = Path(args.report) if args.report else Path(args.onnx) / "quality"
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")
    return 0


def _token_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected comma-separated token ids, e.g. 12,7,99") from None


def prompt_from_bytes(arg: str) -> list[int]:
    """Byte tokens (what the tiny training uses): the argument's own bytes, valid UTF-8 or not (Python
    hands argv over surrogate-escaped, and fsencode gives the bytes back)."""
    return list(os.fsencode(arg))


def cmd_generate(args) -> int:
    import time

    from qwen3next_trt.runtime import Generator, SamplingParams

    from qwen3next_trt.runtime.text import Tokenizer

    if args.prompt and not args.model:
        raise InputError("--prompt needs --model DIR (a checkpoint with tokenizer.json); else give --prompt-ids or --prompt-bytes")
    tokenizer = Tokenizer(args.model) if args.model else None
    prompts = [_token_ids(p, "--prompt-ids") for p in args.prompt_ids]
    prompts += [tokenizer.encode(p) for p in args.prompt]
    prompts += [prompt_from_bytes(p) for p in args.prompt_bytes]
    if not prompts:
        raise InputError("give at least one --prompt (with --model), --prompt-ids or --prompt-bytes")
    if args.engines and args.device != "cpu":
        raise InputError("--device names ONNX Runtime's provider: give it or --engines, not both")
    gen = Generator(args.onnx, engines_dir=args.engines, threads=args.threads, prefill_chunk=args.prefill_chunk, device=args.device)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    stop = _token_ids(args.stop, "--stop") if args.stop else []
    backend = f"TensorRT engines {args.engines}" if args.engines else f"ONNX Runtime ({args.device.upper()} provider)"
    print(f"[generate] {len(prompts)} request(s), {backend}, mtp_k={args.mtp}", flush=True)
    out = [[] for _ in prompts]
    t0 = time.perf_counter()
    for ev in gen.stream(prompts, args.max_new_tokens, sampling, stop, args.mtp):
        out[ev.request].append(ev.token)
        if args.stream:
            print(f"[{ev.request}] {ev.token}{' (end)' if ev.finished else ''}", flush=True)
    st = gen.last_stats
    for r, toks in enumerate(out):
        text = (f"  {tokenizer.decode(toks)!r}" if tokenizer else
                f"  {bytes(t for t in toks if t < 256).decode(errors='replace')!r}" if args.prompt_bytes else "")
        print(f"request {r}: {','.join(map(str, toks))}{text}")
    acc = ", ".join(f"{a:.0%}" for a in st.acceptance)
    print(f"[generate] {st.generated_tokens} tokens in {time.perf_counter() - t0:.2f} s ({st.generated_tokens / max(st.total_s, 1e-9):.1f} tokens/s), "
          f"first token after {st.time_to_first_token_s * 1e3:.0f} ms, {st.tokens_per_main_pass:.2f} tokens per main pass"
          + (f", acceptance per draft position {acc}" if args.mtp else ""))
    if args.json:
        write_file(args.json, json.dumps({"tokens": out, "stats": st.as_dict()}, indent=1))
    return 0


def cmd_deploy(args) -> int:
    from qwen3next_trt.deploy.repository import write_repository

    out = write_repository(args.onnx, args.out, args.engines, default_max_tokens=args.max_tokens, instances=args.instances,
                           batch_window_ms=args.batch_window_ms)
    print(f"wrote Triton model repository {out} (see deploy/README.md; serve it with `python -m qwen3next_trt.deploy.server --repo {out}`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="qwen3next-trt", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    s = sub.add_parser("info", help="config summary, parameter counts, memory, layer plan")
    s.add_argument("--model", required=True, help="preset (tiny, qwen3-next-80b-a3b) or checkpoint directory")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("parity", help="reference vs transformers on one checkpoint (logits, cached decode, greedy)")
    s.add_argument("--model", required=True, help="checkpoint directory (or 'tiny': a seeded random one)")
    s.add_argument("--tokens", type=_int_at_least(2), default=100, help="sequence length of the random tokens (default 100)")
    s.add_argument("--batch", type=_int_at_least(1), default=1)
    s.add_argument("--generate", type=_int_at_least(1), default=24, help="greedy tokens to compare (default 24)")
    s.add_argument("--atol", type=_float_at_least(0), default=1e-4, help="max abs logits error allowed (default 1e-4)")
    s.add_argument("--json", type=output_file("--json"), help="also write the report as JSON here")
    s.set_defaults(fn=cmd_parity)

    s = sub.add_parser("export", help="trace the model layer by layer into ONNX graphs + manifest.json")
    s.add_argument("--model", required=True, help="preset (tiny, qwen3-next-80b-a3b: seeded random weights) or checkpoint directory")
    s.add_argument("--out", required=True, help="output directory (replaced if it holds an earlier export)")
    s.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp32", help="activation and weight dtype (DeltaNet state stays float32)")
    s.add_argument("--layers", type=_spec, default="all", help="'all', or e.g. '0,3', '0-7,final', 'embed,final,mtp,model'")
    s.add_argument("--max-positions", type=_int_at_least(1), help="RoPE table length (default: min(max_position_embeddings, 65536))")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset")
    s.add_argument("--force", action="store_true", help="kept for old scripts: an earlier export is replaced anyway, and no other "
                   "non-empty folder ever is (nor one that is, holds or is inside the checkpoint)")
    s.add_argument("--precision", choices=("none", "fp8"), default="none",
                   help="fp8: linear weights as FP8 E4M3 + scales (DequantizeLinear in the graph); an FP8 checkpoint's own bytes are kept")
    s.add_argument("--fp8-weights", choices=("block", "channel"), default="block",
                   help="how weights of a non-FP8 source are quantised: 128x128 blocks (default) or per output channel")
    s.add_argument("--activations", choices=("none", "fp8", "fp8-dynamic"), default="none",
                   help="fp8: static per-tensor FP8 activations (Q/DQ) before every FP8 MatMul and MoE, scales calibrated; "
                        "fp8-dynamic: per-token scales computed in the graph (no calibration)")
    s.add_argument("--kv-cache", choices=("none", "fp8"), default="none",
                   help="fp8: attention key/value states as FP8 E4M3 with calibrated per-layer scales (half the KV bytes)")
    s.add_argument("--calib", type=int, default=16, help="calibration sequences (256 tokens each) for --activations fp8")
    s.add_argument("--calib-percentile", type=float, help="use this percentile of |x| instead of the max (e.g. 99.99)")
    s.add_argument("--calib-file", type=output_file("--calib-file"), help="calibration file (JSON): scales of layers already in it are reused, new ones added "
                                        "after every layer (resume, or split a long calibration); made by `calibrate` or here")
    s.add_argument("--device", default="cpu", help="where calibration runs: cpu (float32) or cuda[:N] (bf16, ranges in float32); "
                                                   "tracing is CPU work either way")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("calibrate", help="FP8 activation / KV-cache scales into a calibration file, layer by layer (resumable)")
    s.add_argument("--model", required=True, help="preset (seeded random weights) or checkpoint directory")
    s.add_argument("--out", required=True, type=output_file("--out"), help="calibration file (JSON); if it exists, its finished layers are reused")
    s.add_argument("--layers", type=_spec, default="all", help="'all' (every layer + mtp), or layer numbers / ranges, and 'mtp' (e.g. 0-23, 24-47,mtp)")
    s.add_argument("--device", default="cpu", help="cpu (float32) or cuda[:N] (bf16, ranges in float32)")
    s.add_argument("--draw", choices=("cpu", "device"), default="cpu",
                   help="a preset's random weights: drawn on the CPU (the weights an export of the preset has) or on "
                        "--device (fast; other weights, so its file serves only runs drawn the same way)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset")
    s.add_argument("--calib", type=int, default=16, help="calibration sequences (256 tokens each)")
    s.add_argument("--calib-percentile", type=float, help="use this percentile of |x| instead of the max (e.g. 99.99)")
    s.add_argument("--times", type=output_file("--times"), help="also write the per-layer times (materialise, run) as JSON here")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("validate", help="every exported graph vs the PyTorch reference (polygraphy), and end to end")
    s.add_argument("--onnx", required=True, help="export directory (with manifest.json)")
    s.add_argument("--backend", default="onnxrt", choices=BACKENDS, help="onnxrt (ONNX Runtime CPU); onnxrt-cuda (its CUDA "
                   "provider, beside the CPU one); tensorrt (engines on the GPU, beside ONNX Runtime CPU)")
    s.add_argument("--tf32", action="store_true", help="onnxrt-cuda: let float32 MatMuls use TF32 (off: compared in float32)")
    s.add_argument("--engines", help="engines directory for --backend tensorrt")
    s.add_argument("--model", help="weights to use instead of the manifest's source (e.g. a moved checkpoint)")
    s.add_argument("--report", help="report directory (default: ONNX_DIR/validation)")
    s.add_argument("--generate", type=_int_at_least(1), default=24, help="greedy tokens of the end-to-end loop (default 24)")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("build", help="compile the exported ONNX graphs into TensorRT engines")
    s.add_argument("--onnx", required=True, help="export directory (with manifest.json)")
    s.add_argument("--out", required=True, help="engines directory")
    s.add_argument("--graphs", type=_spec, default="all", help="'all' or a comma list of graph names / groups (layer_03, final, model.prefill); one engine per "
                   "weights group, serving the selected graphs of it (layer_03: prefill + decode, two profiles)")
    s.add_argument("--max-batch", type=_int_at_least(1), default=4)
    s.add_argument("--max-seq", type=_int_at_least(1), default=256, help="longest prefill chunk")
    s.add_argument("--max-context", type=_int_at_least(1), default=4096, help="longest past (KV cache) length")
    s.add_argument("--opt-level", type=_int_range(0, 5), default=3, help="builder optimization level 0..5")
    s.add_argument("--trt", choices=("auto", "tensorrt", "tensorrt_rtx"), default="auto")
    s.add_argument("--compute-capability", help="TensorRT-RTX targets, e.g. SM80,SM89,SM120 (default)")
    s.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    s.add_argument("--embed-plugins", action="store_true",
                   help="store the C++ plugin library in each plan (plugins_to_serialize): hosts need not load it")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("plugin-library", help="build (if needed) the C++ TensorRT plugin library; print its path and the headers it was built with")
    s.set_defaults(fn=cmd_plugin_library)

    s = sub.add_parser("inspect", help="engine metadata and layer list")
    s.add_argument("path", help="an .engine file (or its .engine.json) or an engines directory")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("quality", help="FP8 export vs the unquantised reference: per-graph errors, logits KL/top-1/top-5")
    s.add_argument("--onnx", required=True, help="an export made with --precision fp8")
    s.add_argument("--model", help="weights to use instead of the manifest's source")
    s.add_argument("--report", help="report directory (default: ONNX_DIR/quality)")
    s.add_argument("--tokens", type=_int_at_least(2), default=128, help="tokens per sequence for the logit metrics")
    s.set_defaults(fn=cmd_quality)

    s = sub.add_parser("generate", help="generate tokens through the exported graphs (runtime/): batching, sampling, streaming, MTP")
    s.add_argument("--onnx", required=True, help="export directory (with manifest.json)")
    s.add_argument("--engines", help="run TensorRT engines from this directory instead of ONNX Runtime")
    s.add_argument("--model", help="checkpoint directory whose tokenizer.json encodes --prompt and decodes the output")
    s.add_argument("--prompt", action="append", default=[], help="a text prompt (needs --model with tokenizer.json); repeatable")
    s.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids; repeat for a batch")
    s.add_argument("--prompt-bytes", action="append", default=[], help="a prompt as UTF-8 bytes (token = byte, as in bench/train_tiny.py)")
    s.add_argument("--max-new-tokens", type=_int_at_least(1), default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", help="comma-separated stop token ids")
    s.add_argument("--mtp", type=_int_range(0, 4), default=0, help="MTP speculative decoding with K draft tokens (1..4; greedy)")
    s.add_argument("--stream", action="store_true", help="print every token as it is produced")
    s.add_argument("--threads", type=_int_at_least(1), help="ONNX Runtime intra-op threads")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime's provider: CPU, or CUDA (needs onnxruntime-gpu and a GPU)")
    s.add_argument("--prefill-chunk", type=_int_at_least(1), help="prefill long prompts in chunks of this many tokens")
    s.add_argument("--json", type=output_file("--json"), help="write tokens and stats here")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("deploy", help="write a Triton Inference Server model repository (Python-backend runtime model, tensorrt_plan entries)")
    s.add_argument("--onnx", required=True, help="export directory (with manifest.json)")
    s.add_argument("--engines", help="engines directory: the runtime model runs them, and each gets a tensorrt_plan entry")
    s.add_argument("--out", required=True, help="repository directory (replaced if it holds an earlier repository)")
    s.add_argument("--max-tokens", type=_int_at_least(1), default=16, help="default max_tokens of a request")
    s.add_argument("--instances", type=_int_at_least(1), default=1, help="model instances (CPU processes)")
    s.add_argument("--batch-window-ms", type=int, default=10, help="how long the model gathers greedy requests into one batch")
    s.set_defaults(fn=cmd_deploy)

    s = sub.add_parser("random-checkpoint", help="write a seeded random HF-format checkpoint of a config")
    s.add_argument("--model", required=True, help="preset or checkpoint directory (its config)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp32")
    s.add_argument("--shard-mb", type=_int_at_least(1, " (MiB per shard)"), default=1024)
    s.set_defaults(fn=cmd_random_checkpoint)
    return p


def _raise_interrupted(signum, frame):
    # the first signal stops the command; more while it cleans up would cut the cleanup short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Python's default SIGTERM ends the process without unwinding, so no cleanup would run; signal
    # handlers can be set only from the main thread (the tests also run commands in threads)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return args.fn(args)
    except (InputError, ToleranceError, NumericalError) as e:
        if args.debug:
            raise
        print(str(e) if isinstance(e, ToleranceError) else f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        if args.debug:
            raise
        out = getattr(args, "out", None)
        print(f"interrupted: {signal.Signals(e.signum).name}: {args.command} stopped"
              + (f"; no partial files left beside {out}" if out else ""), file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
