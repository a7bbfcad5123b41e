"""Print the trtexec commands that build (or time) TensorRT engines from a qwen3next-trt export.

    python examples/cpp/trtexec_commands.py --onnx out/tiny --plugins LIB.so --out trt [--per-graph] [--time]

The shapes are the ones `qwen3next-trt build` gives its profiles (engines/builder.py, Limits: batch
1..max_batch, seq 1..max_seq, past 0..max_context-1), read from the export's manifest.json, so the
commands fit any model size. Nothing runs here: the output is a shell script for a machine with full
TensorRT (examples/cpp/README.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from qwen3next_trt.engines.builder import Limits
from qwen3next_trt.errors import InputError
from qwen3next_trt.export.manifest import DECODE, PREFILL, GraphRecord, Manifest


def profile_shapes(record: GraphRecord, limits: Limits, mode: str) -> list[str]:
    """--minShapes/--optShapes/--maxShapes of the dynamic inputs, for the graph's own mode or `decode`
    (seq = 1) when a prefill graph also serves as the decode profile of a two-profile engine."""
    specs = [[], [], []]
    for port in record.inputs:
        if not port.dynamic:
            continue
        ranges = [(d, d, d) if isinstance(d, int) else limits.ranges(d, mode) for d in port.shape]
        for which in range(3):
            specs[which].append(f"{port.name}:" + "x".join(str(r[which]) for r in ranges))
    if not specs[0]:
        return []
    return [f"--{flag}Shapes={','.join(s)}" for flag, s in zip(("min", "opt", "max"), specs)]


def step_shapes(record: GraphRecord, batch: int, past: int) -> list[str]:
    """--shapes of one decode step: `batch` sequences, one new token each, `past` cached positions."""
    value = {"batch": batch, "seq": 1, "past": past}

    def size(d) -> int:  # 128, "batch", "past + seq", "past + 1"
        if isinstance(d, int):
            return d
        return sum(int(t) if t.isdigit() else value[t] for t in (part.strip() for part in d.split("+")))

    specs = [f"{p.name}:" + "x".join(str(size(d)) for d in p.shape) for p in record.inputs if p.dynamic]
    return [f"--shapes={','.join(specs)}"] if specs else []


def uses_plugins(record: GraphRecord) -> bool:
    return any(op.startswith("com.microsoft::") for op in record.ops)


def engines_of(manifest: Manifest, per_graph: bool = False) -> list[tuple[str, GraphRecord, list[str]]]:
    """(engine name, the graph it is built from, the modes of its profiles), in export order. As
    `qwen3next-trt build` lays them out: one engine per weights group (`layer_00`, `mtp`, `embed`, ...);
    a prefill + decode pair is built from the prefill graph (its seq axis is dynamic, so it computes the
    decode case too) with profile 0 prefill and profile 1 decode. per_graph: one engine per graph."""
    groups: dict[str, list[GraphRecord]] = {}
    for g in manifest.graphs:
        if g.kind.value != "model":  # the stitched whole-model graph: for validation, not for engines
            groups.setdefault(g.weights.removesuffix(".weights"), []).append(g)
    engines = []
    for group, graphs in groups.items():
        pair = sorted(g.mode for g in graphs) == [DECODE, PREFILL]
        if pair and not per_graph:
            engines.append((group, next(g for g in graphs if g.mode == PREFILL), [PREFILL, DECODE]))
        else:
            engines += [(g.name if per_graph else group, g, [g.mode]) for g in graphs]
    return engines


def commands(manifest: Manifest, onnx_dir: Path, out: Path, plugins: str, limits: Limits, per_graph: bool = False,
             embed_plugins: bool = False, time: bool = False, batch: int = 1, past: int | None = None) -> list[list[str]]:
    """One trtexec argv per engine: build commands, or (time=True) the decode-step timing commands."""
    past = min(limits.max_context // 2, 1024) if past is None else past
    engines = engines_of(manifest, per_graph)
    argvs = []
    for name, g, modes in engines:
        plugin_flags = [f"--dynamicPlugins={plugins}"] if uses_plugins(g) else []
        engine = str(out / f"{name}.engine")
        if time:
            if modes == [PREFILL] or g.kind.value in ("mtp", "lm_head"):
                continue  # a decode step runs embed, each layer's decode engine (or profile), final
            argvs.append(["trtexec", f"--loadEngine={engine}", *plugin_flags,
                          *(["--useProfile=1"] if len(modes) == 2 else []), *step_shapes(g, batch, past)])
            continue
        argv = ["trtexec", f"--onnx={onnx_dir / g.file}", f"--saveEngine={engine}", "--stronglyTyped", "--skipInference",
                f"--timingCacheFile={out / 'timing.cache'}", *plugin_flags]
        if embed_plugins and plugin_flags:
            argv.append(f"--setPluginsToSerialize={plugins}")
        if manifest.dtype == "fp32" and "Attention" in g.ops:
            # TensorRT's fused attention takes 16-bit inputs only; `qwen3next-trt build` sets this too
            argv.append("--decomposableAttentions=*")
        if len(modes) == 1:
            argv += profile_shapes(g, limits, modes[0])
        else:
            for i, mode in enumerate(modes):
                argv += [f"--profile={i}", *profile_shapes(g, limits, mode)]
        argvs.append(argv)
    return argvs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", required=True, help="export folder (manifest.json)")
    ap.add_argument("--plugins", required=True, help="libqwen3next_trt_plugins.so (`qwen3next-trt plugin-library` prints it)")
    ap.add_argument("--out", required=True, help="folder for the engines in the commands")
    ap.add_argument("--per-graph", action="store_true",
                    help="one engine per graph (layer_00.prefill, layer_00.decode), not one per layer with two profiles")
    ap.add_argument("--embed-plugins", action="store_true", help="--setPluginsToSerialize: the plans carry the library")
    ap.add_argument("--time", action="store_true", help="print trtexec --loadEngine commands timing one decode step")
    ap.add_argument("--batch", type=int, default=1, help="--time: sequences per step (default 1)")
    ap.add_argument("--past", type=int, default=None, help="--time: cached positions (default: the profile's opt)")
    ap.add_argument("--max-batch", type=int, default=Limits.max_batch)
    ap.add_argument("--max-seq", type=int, default=Limits.max_seq)
    ap.add_argument("--max-context", type=int, default=Limits.max_context)
    args = ap.parse_args(argv)
    try:
        manifest = Manifest.load(args.onnx)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest.precision.weights.fp8 and not args.time:
        print("# warning: FP8 export: trtexec parses its DequantizeLinear -> MoE nodes as they are (no fold into the MoE "
              "plugin's FP8 form, which `qwen3next-trt build` does): build FP8 engines with `qwen3next-trt build`", file=sys.stderr)
    limits = Limits(args.max_batch, args.max_seq, args.max_context)
    if not args.time:
        print(shlex.join(["mkdir", "-p", args.out]))  # trtexec does not make the folder of --saveEngine
    for argv_ in commands(manifest, Path(args.onnx), Path(args.out), args.plugins, limits, args.per_graph,
                          args.embed_plugins, args.time, args.batch, args.past):
        print(shlex.join(argv_))
    return 0


if __name__ == "__main__":
    sys.exit(main())
