"""Write a Triton model repository for an export (and optionally its engines).

Layout written by `write_repository(onnx_dir, out, engines_dir)`:

    out/
      README.md                       how to serve it (and the TensorRT plugin note)
      qwen3next/config.pbtxt          Python backend, decoupled: token ids in, tokens streamed out
      qwen3next/1/model.py            deploy/triton_model.py
      <prefix>_<group>/config.pbtxt   only with engines: one `tensorrt_plan` model per engine file
      <prefix>_<group>/1/model.plan   symlink to the engine (engines are large; never copied)

An engine serves its weights group's prefill and decode graphs through two optimization profiles;
its one model lists both in `instance_group { profile: ["0", "1"] }`, so one instance deserialises
the plan once (one copy of the weights) and Triton picks the profile per request from the input
shapes (deploy/README.md).

The repository refers to the export and engines by absolute path, so it is small and is written
in a temporary folder beside `out`, then renamed into place: a failed write leaves nothing half-made.
This module imports no torch: the Triton Python backend imports `check_sources` from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qwen3next_trt.errors import InputError
from qwen3next_trt.outputs import check_output, staged
from qwen3next_trt.engines.metadata import check_engine_source, engine_file_name, engine_group, read_engine_meta
from qwen3next_trt.export.manifest import Manifest

MODEL_NAME = "qwen3next"
MARKER = ".qwen3next-repository"   # lets a later `deploy` replace a repository it wrote, and nothing else
TEMPLATE = Path(__file__).with_name("triton_model.py")

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "int8": "TYPE_INT8", "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}


def check_sources(onnx_dir, engines_dir=None) -> tuple[Manifest, list[dict]]:
    """(manifest, engine metadata list) after checking what serving needs: every graph generation runs
    (Manifest.generation_graphs) with its files matching the manifest's hashes, and, with engines, an
    engine serving each such graph (one per weights group), built from this very export's graphs and
    weights. InputError naming the first failure."""
    manifest = Manifest.load(onnx_dir)
    needed = [manifest.graph(n) for n in manifest.generation_graphs()]
    manifest.verify(needed)
    if engines_dir is None:
        return manifest, []
    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        raise InputError(f"{engines_dir}: engines directory missing (run `qwen3next-trt build` first)")
    metas, served = [], {}
    for meta_path in sorted(engines_dir.glob("*.engine.json")):
        meta = read_engine_meta(meta_path)
        for graph in meta["graphs"]:
            if not manifest.has(graph):
                raise InputError(f"{meta_path}: an engine for graph {graph!r}, which {manifest.path} does not list "
                                 "(engines of another export?)")
            check_engine_source(meta, meta_path, manifest, manifest.graph(graph))
            served[graph] = meta
        metas.append(meta)
    for rec in needed:
        if rec.name not in served:
            engine = engines_dir / engine_file_name(engine_group(rec))
            meta = next((m for m in metas if m["engine"] == engine.name), None)
            what = (f"serves {', '.join(meta['graphs'])} only, not graph {rec.name!r}" if meta
                    else f"missing (no engine for graph {rec.name!r}")
            raise InputError(f"{engine}: {what}; run `qwen3next-trt build --onnx {onnx_dir} --out {engines_dir}`"
                             + ("" if meta else ")"))
    return manifest, metas


# -- config.pbtxt text ----------------------------------------------------------------------------

def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{opt} }}'


def _params(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(str(v), ensure_ascii=False)} }} }}' for k, v in params.items())


def python_model_config(name: str, onnx_dir: Path, engines_dir: Path | None, default_max_tokens: int, instances: int,
                        batch_window_ms: float = 10.0) -> str:
    inputs = [
        _tensor("input_ids", "TYPE_INT64", [-1]),
        _tensor("max_tokens", "TYPE_INT32", [1], optional=True),
        _tensor("temperature", "TYPE_FP32", [1], optional=True),
        _tensor("top_p", "TYPE_FP32", [1], optional=True),
        _tensor("seed", "TYPE_INT64", [1], optional=True),
        _tensor("stop_tokens", "TYPE_INT64", [-1], optional=True),
        _tensor("mtp_k", "TYPE_INT32", [1], optional=True),
        _tensor("stream", "TYPE_BOOL", [1], optional=True),
    ]
    params = {"onnx_dir": str(onnx_dir), "engines_dir": str(engines_dir or ""), "default_max_tokens": str(default_max_tokens),
              "batch_window_ms": str(batch_window_ms)}
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "# One response per generated token (or one with all of them when the request sets stream=false).",
        "model_transaction_policy { decoupled: true }",
        "input [", ",\n".join(inputs), "]",
        "output [", _tensor("tokens", "TYPE_INT64", [-1]), "]",
        f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]",
        _params(params),
        "",
    ])


def plan_model_name(prefix: str, group: str) -> str:
    return f"{prefix}_{group.replace('.', '_')}"


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def plan_model_config(name: str, meta: dict) -> str:
    def port(p):
        if p["dtype"] not in TRITON_DTYPES:
            raise InputError(f"{meta['engine']}.json: tensor {p['name']!r} has dtype {p['dtype']!r}, which Triton has no type for")
        return _tensor(p["name"], TRITON_DTYPES[p["dtype"]], _dims(p["shape"]))

    trt = meta.get("tensorrt", {})
    graphs = sorted(meta["graphs"].items(), key=lambda gi: gi[1])
    if len(graphs) > 1:
        instance = ("instance_group [ { kind: KIND_GPU count: 1 profile: [ "
                    + ", ".join(f'"{i}"' for _, i in graphs) + " ] } ]")
        note = ["# One plan, several optimization profiles: " + "; ".join(f"profile {i} serves {g}" for g, i in graphs) + ".",
                "# Triton gives each listed profile an execution context of this instance's one engine (one copy of the",
                "# weights) and runs a request on a listed profile whose ranges admit its shapes, the one nearest its opt",
                "# shapes. count > 1 would deserialise the plan once per instance (dynamic shapes: no engine sharing)."]
    else:
        instance = "instance_group [ { kind: KIND_GPU count: 1 } ]"
        note = [f"# graph {graphs[0][0]}"]
    return "\n".join([
        f'name: "{name}"',
        'platform: "tensorrt_plan"',
        f"# engine {meta['engine']} built by {trt.get('flavour', '?')} {trt.get('version', '?')}; plugins: "
        + (", ".join(p["name"] for p in meta.get("plugins", [])) or "none"),
        *note,
        "# Batch is an explicit engine dimension, so Triton must not add one.",
        "max_batch_size: 0",
        'default_model_filename: "model.plan"',
        "input [", ",\n".join(port(p) for p in meta["inputs"]), "]",
        "output [", ",\n".join(port(p) for p in meta["outputs"]), "]",
        instance,
        "",
    ])


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse with Triton's own ModelConfig protobuf; InputError with the parser's message if it fails."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise InputError(f"{where}: not a valid Triton model configuration: {e}") from None


# -- the repository -------------------------------------------------------------------------------

README = """# Triton model repository for {onnx_dir}

Written by `qwen3next-trt deploy`. `{name}` is a Python-backend model (decoupled) that runs the
project's runtime (`qwen3next_trt.runtime`) on the exported graphs{engines_note}.

Inputs: `input_ids` INT64 [n] (one prompt per request), optional `max_tokens` INT32 [1]
(default {default_max_tokens}), `temperature` FP32 [1] (0 = greedy), `top_p` FP32 [1], `seed` INT64 [1],
`stop_tokens` INT64 [k], `mtp_k` INT32 [1] (MTP draft tokens, 0..4), `stream` BOOL [1] (default true).
Output: `tokens` INT64: one response per token (stream true) or one with all tokens (stream false),
then the final flag. gRPC `stream_infer` streams; HTTP has `POST /v2/models/{name}/generate_stream`
(server-sent events) and, with `"stream": false`, `POST /v2/models/{name}/generate`.
Bad input (empty prompt, id out of vocabulary, prompt + max_tokens over the context, mtp_k out of
range) is answered with an error (HTTP 400) naming the field; other requests go on.

The Python backend's interpreter needs numpy, onnxruntime and this project
(`pip install --no-deps -e <qwen3next-trt checkout>`). Start it with
`python -m qwen3next_trt.deploy.server --repo {out}` (the pytriton wheel's `tritonserver`), or with any
Triton 2.4x+: `tritonserver --model-repository {out} --model-control-mode explicit --load-model {name}`.
{plan_note}"""

PLAN_NOTE = """
## `tensorrt_plan` entries (hosts with Triton's TensorRT backend)

{count} models `{prefix}_<group>`, one per engine file in `{engines_dir}` (`1/model.plan` links to the
engine). An engine holds its weights group once and serves the group's graphs through optimization
profiles: `{prefix}_layer_00` runs `layer_00.prefill` (profile 0) and `layer_00.decode` (profile 1,
one token). Its `instance_group {{ count: 1 profile: ["0", "1"] }}` gives the one instance an execution
context per profile over one deserialised engine; Triton runs each request on the listed profile whose
ranges admit its input shapes, nearest to that profile's opt shapes (a prompt of several tokens fits
the prefill profile only). Send prefill and decode steps to the same model. Raising `count` deserialises
the plan once more per instance (engines with dynamic shapes are not shared between instances), and
so would two models pointing at the same plan: each copy holds the group's weights again. Each model is
one part with its states as plain inputs and outputs; the token loop lives in `{name}`.
They load only where:
- the engines were built by the same TensorRT version as the server's TensorRT backend (these
  were built by {flavours}; Triton's backend links full TensorRT, which cannot load TensorRT-RTX plans:
  rebuild with `qwen3next-trt build --trt tensorrt` on the serving host);
- the plugins the graphs use ({plugins}) are in the server's process: start the server with
  `--backend-config=tensorrt,plugins={plugin_library}` (several libraries separated by `;`);
  `python -m qwen3next_trt.deploy.server` passes it (the path is recorded in `{marker}`). The project's
  C++ plugin library is `libqwen3next_trt_plugins.so` (`qwen3next-trt plugin-library` builds it and
  prints its path); build it on the serving host against that host's TensorRT headers. Serving these
  entries through Triton's TensorRT backend has not been run here (no TensorRT that runs on Hopper is
  reachable). Engines without plugin layers: {plain}.
"""


def plugin_library_for(metas: list[dict], engines_dir: Path | None) -> str | None:
    """The C++ plugin library the engines' plans need loaded beside them: the one they were built with
    (recorded in their metadata, checked by sha256), or this host's build of it when that has the same
    hash; None when every plan embeds it or there are no engines. InputError when it is missing or differs."""
    from qwen3next_trt.engines.metadata import metadata_path, plugin_library_path

    found = {plugin_library_path(m, metadata_path(engines_dir / m["engine"])) for m in metas}
    found.discard(None)
    if len(found) > 1:
        raise InputError(f"{engines_dir}: the engines were built with different plugin libraries ({', '.join(map(str, sorted(found)))}): "
                         "rebuild them together")
    return str(found.pop()) if found else None


def write_repository(onnx_dir, out, engines_dir=None, *, model_name: str = MODEL_NAME, plan_prefix: str = MODEL_NAME,
                     default_max_tokens: int = 16, instances: int = 1, batch_window_ms: float = 10.0) -> Path:
    """Write the repository at `out` (replacing one this function wrote before); returns its path.

    InputError, before anything is written, if the export or (when given) the engines are incomplete,
    or if `out` exists and is not a repository written here.
    """
    onnx_dir = Path(onnx_dir).resolve()
    engines_dir = Path(engines_dir).resolve() if engines_dir is not None else None
    out_arg, out = out, Path(out).resolve()
    check_output(out_arg, "--out", {"export (--onnx)": onnx_dir, "engines (--engines)": engines_dir},
                 lambda p: (p / MARKER).is_file(), "a model repository written by `qwen3next-trt deploy`", MARKER)
    _, metas = check_sources(onnx_dir, engines_dir)
    plugin_library = plugin_library_for(metas, engines_dir)
    if default_max_tokens < 1:
        raise InputError(f"default_max_tokens: must be >= 1, got {default_max_tokens}")
    if not 0 <= batch_window_ms <= 10_000:
        raise InputError(f"batch_window_ms: expected 0 .. 10000, got {batch_window_ms}")
    if instances < 1:
        raise InputError(f"instances: must be >= 1, got {instances}")

    configs = {model_name: python_model_config(model_name, onnx_dir, engines_dir, default_max_tokens, instances, batch_window_ms)}
    for meta in metas:
        configs[plan_model_name(plan_prefix, meta["group"])] = plan_model_config(plan_model_name(plan_prefix, meta["group"]), meta)
    for name, text in configs.items():
        parse_config(text, f"{out / name / 'config.pbtxt'}")  # a malformed config never reaches a server

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as tmp:
        _write_into(tmp, out, configs, metas, onnx_dir, engines_dir, model_name, plan_prefix, default_max_tokens, plugin_library)
    return out


def _write_into(tmp: Path, out: Path, configs: dict, metas: list, onnx_dir: Path, engines_dir: Path | None, model_name: str,
                plan_prefix: str, default_max_tokens: int, plugin_library: str | None):
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the repository from a server run as another user
    for name, text in configs.items():
        (tmp / name / "1").mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(text)
    shutil.copyfile(TEMPLATE, tmp / model_name / "1" / "model.py")
    for meta in metas:
        os.symlink(engines_dir / meta["engine"], tmp / plan_model_name(plan_prefix, meta["group"]) / "1" / "model.plan")
    plan_note = ""
    if metas:
        plan_note = PLAN_NOTE.format(
            count=len(metas), prefix=plan_prefix, engines_dir=engines_dir, name=model_name, marker=MARKER,
            flavours=", ".join(sorted({f"{m.get('tensorrt', {}).get('flavour', '?')} {m.get('tensorrt', {}).get('version', '?')}" for m in metas})),
            plugins=", ".join(sorted({p["name"] for m in metas for p in m.get("plugins", [])})) or "none",
            plugin_library=f'"{plugin_library}"' if plugin_library else '"/path/libqwen3next_trt_plugins.so"',
            plain=", ".join(m["engine"] for m in metas if not m.get("plugin_layers")) or "none")
    engines_note = f" (engines: {engines_dir})" if engines_dir else ""
    (tmp / "README.md").write_text(README.format(onnx_dir=onnx_dir, name=model_name, out=out, engines_note=engines_note,
                                                 default_max_tokens=default_max_tokens, plan_note=plan_note))
    # the launcher (deploy/server.py) passes the plugin library to the TensorRT backend from here
    (tmp / MARKER).write_text(json.dumps({"onnx_dir": str(onnx_dir), "engines_dir": str(engines_dir or ""),
                                          "models": sorted(configs), "plugin_library": plugin_library}, indent=2))
    return out
