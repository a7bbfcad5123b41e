"""deploy/: the Triton model repository, checked with Triton's own config protobuf and a real server.

The server is the `tritonserver` binary of the nvidia-pytriton wheel (in .venv/triton, made by
setup.sh), on loopback, CPU only, serving the tiny export through ONNX Runtime. Oracle for the
tokens: the PyTorch reference model's own greedy decoding (`generate_greedy`), run here in the test
process, independent of the runtime and the graphs the server uses.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from qwen3next_trt.deploy.repository import MARKER, check_sources, plan_model_name, write_repository
from qwen3next_trt.errors import InputError

tritonclient = pytest.importorskip("tritonclient")  # part of the test extra; present wherever setup.sh ran
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

PROMPTS = [[1, 2, 3], [17, 300, 5, 9, 41], [7], [100, 200, 300, 400, 500, 8, 9]]
N_NEW = 8


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def groups_of(manifest: dict) -> dict[str, list[dict]]:
    """{group: its graphs, prefill first}, as `build` makes one engine of each weights group."""
    groups: dict = {}
    for g in manifest["graphs"]:
        groups.setdefault(g["weights"].removesuffix(".weights"), []).append(g)
    return {k: sorted(v, key=lambda g: g["mode"] != "prefill") for k, v in groups.items()}


def fake_engines(export: Path, out: Path, plugin_library: Path | None = None) -> Path:
    """An engines directory in the layout `qwen3next-trt build` writes: `<group>.engine` + `.engine.json`,
    one per weights group, serving its graphs through a profile each.

    The plan files are empty: these tests check the repository around them, which needs no GPU."""
    manifest = json.loads((export / "manifest.json").read_text())
    out.mkdir()
    for group, graphs in groups_of(manifest).items():
        (out / f"{group}.engine").write_bytes(b"")
        first = graphs[0]
        meta = {"format": "qwen3next-trt/engine", "version": 2, "group": group, "engine": f"{group}.engine",
                "graphs": {g["name"]: i for i, g in enumerate(graphs)}, "built_from": first["name"],
                "inputs": first["inputs"], "outputs": first["outputs"], "profiles": [{} for _ in graphs], "layers": [],
                # tied to the export as `build` ties them: the graphs' and their weights' sha256
                "onnx_sha256": first["sha256"], "graph_sha256": {g["name"]: g["sha256"] for g in graphs},
                "weights_sha256": manifest["weights"][first["weights"]]["sha256"],
                "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"},
                "plugins": [{"name": "MoE", "version": "1", "namespace": ""}],
                "plugin_layers": ["MoE"] if first.get("moe") else []}
        if plugin_library:
            meta["plugin_library"] = {"path": str(plugin_library), "embedded": False}
        (out / f"{group}.engine.json").write_text(json.dumps(meta))
    return out


# ---------------------------------------------------------------------------------------------
# The repository, without a server


def test_repository_configs_parse_with_tritons_protobuf(tiny_export, tmp_path):
    engines = fake_engines(tiny_export, tmp_path / "engines")
    repo = write_repository(tiny_export, tmp_path / "repo", engines_dir=engines)
    manifest = json.loads((tiny_export / "manifest.json").read_text())

    cfg = parse(repo / "qwen3next" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    inputs = {i.name: i for i in cfg.input}
    assert list(inputs["input_ids"].dims) == [-1] and inputs["input_ids"].data_type == model_config_pb2.TYPE_INT64
    assert not inputs["input_ids"].optional
    assert all(inputs[n].optional for n in ("max_tokens", "temperature", "top_p", "seed", "stop_tokens", "mtp_k", "stream"))
    assert [o.name for o in cfg.output] == ["tokens"] and cfg.output[0].data_type == model_config_pb2.TYPE_INT64
    assert cfg.parameters["onnx_dir"].string_value == str(tiny_export.resolve())
    assert cfg.parameters["engines_dir"].string_value == str(engines.resolve())
    assert (repo / "qwen3next" / "1" / "model.py").read_text().startswith('"""Triton Python-backend model')

    # one tensorrt_plan model per engine file, ports and symbolic dims from the engine metadata (the
    # prefill graph's); a two-profile engine's one instance has both profiles: Triton picks by shape
    groups = groups_of(manifest)
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith("qwen3next_")) == sorted(
        plan_model_name("qwen3next", g) for g in groups)
    for group, graphs in groups.items():
        name, g = plan_model_name("qwen3next", group), graphs[0]
        plan = parse(repo / name / "config.pbtxt")
        assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 0 and plan.name == name
        assert [i.name for i in plan.input] == [p["name"] for p in g["inputs"]]
        assert [o.name for o in plan.output] == [p["name"] for p in g["outputs"]]
        for port, spec in zip(list(plan.input) + list(plan.output), g["inputs"] + g["outputs"]):
            assert list(port.dims) == [d if isinstance(d, int) else -1 for d in spec["shape"]]
        [instances] = plan.instance_group
        assert instances.count == 1 and list(instances.profile) == (["0", "1"] if len(graphs) == 2 else [])
        link = repo / name / "1" / "model.plan"
        assert link.is_symlink() and link.resolve() == (engines / f"{group}.engine").resolve()
    assert "profile 0 serves layer_00.prefill; profile 1 serves layer_00.decode" in (repo / "qwen3next_layer_00" / "config.pbtxt").read_text()
    readme = (repo / "README.md").read_text()
    assert "--backend-config=tensorrt,plugins=" in readme and "tensorrt_rtx 1.7.1.116" in readme


def test_repository_is_replaced_whole_and_leaves_no_temp(tiny_export, tmp_path):
    repo = write_repository(tiny_export, tmp_path / "repo", engines_dir=fake_engines(tiny_export, tmp_path / "e"))
    assert (repo / "qwen3next_embed").is_dir()
    write_repository(tiny_export, repo)  # again, without engines: the plan entries must go
    assert not (repo / "qwen3next_embed").exists() and (repo / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "repo"]


def _partial_export(export: Path, dest: Path, drop: str) -> Path:
    dest.mkdir()
    for f in export.iterdir():
        if f.name != drop:
            (dest / f.name).symlink_to(f)
    return dest


@pytest.mark.parametrize("case", ["no manifest", "graph file", "weights file", "engine", "engine metadata", "graph not served",
                                  "old engine metadata", "out not ours"])
def test_repository_refuses_incomplete_sources(tiny_export, tmp_path, case):
    onnx, engines, out = tiny_export, None, tmp_path / "repo"
    if case == "no manifest":
        onnx, expected = _partial_export(tiny_export, tmp_path / "x", "manifest.json"), "manifest.json: not found"
    elif case == "graph file":
        onnx, expected = _partial_export(tiny_export, tmp_path / "x", "layer_05.decode.onnx"), "layer_05.decode.onnx: missing"
    elif case == "weights file":
        onnx, expected = _partial_export(tiny_export, tmp_path / "x", "final.weights"), "final.weights: missing"
    elif case == "engine":
        engines = fake_engines(tiny_export, tmp_path / "e")
        (engines / "layer_03.engine").unlink()
        expected = "layer_03.engine: missing"
    elif case == "engine metadata":
        engines = fake_engines(tiny_export, tmp_path / "e")
        (engines / "final.engine.json").unlink()
        expected = "final.engine: missing (no engine for graph 'final'"
    elif case == "graph not served":  # an engine built from `--graphs layer_02.prefill` alone
        engines = fake_engines(tiny_export, tmp_path / "e")
        meta = json.loads((engines / "layer_02.engine.json").read_text())
        meta["graphs"] = {"layer_02.prefill": 0}
        (engines / "layer_02.engine.json").write_text(json.dumps(meta))
        expected = "layer_02.engine: serves layer_02.prefill only, not graph 'layer_02.decode'"
    elif case == "old engine metadata":  # engines of the layout with one engine per graph
        engines = fake_engines(tiny_export, tmp_path / "e")
        meta = json.loads((engines / "embed.engine.json").read_text())
        del meta["version"]
        (engines / "embed.engine.json").write_text(json.dumps(meta))
        expected = "embed.engine.json: engine metadata version 1"
    else:
        out.mkdir()
        (out / "precious.txt").write_text("x")
        expected = "is not a model repository written by"
    with pytest.raises(InputError) as err:
        write_repository(onnx, out, engines_dir=engines)
    assert expected in str(err.value)
    # nothing half-written beside the target
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]
    if case != "out not ours":
        assert not out.exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_launcher_refuses_a_repository_whose_plugin_library_is_gone(tiny_export, tmp_path):
    from qwen3next_trt.deploy.server import plugin_libraries

    library = tmp_path / "lib.so"
    library.write_bytes(b"")
    repo = write_repository(tiny_export, tmp_path / "repo", engines_dir=fake_engines(tiny_export, tmp_path / "e", library))
    assert json.loads((repo / MARKER).read_text())["plugin_library"] == str(library)
    assert plugin_libraries([repo]) == [str(library)]
    library.unlink()
    with pytest.raises(InputError, match=r"lib\.so: the C\+\+ plugin library that the tensorrt_plan models of .* need is missing"):
        plugin_libraries([repo])
    assert plugin_libraries([write_repository(tiny_export, tmp_path / "plain")]) == []  # no plan models: nothing to load


def test_deploy_refuses_engines_whose_plugin_library_is_missing_or_another(tiny_export, tmp_path):
    """A plan names its plugins only: the library it was built with (by sha256) must be the one loaded."""
    import hashlib

    library = tmp_path / "lib.so"
    library.write_bytes(b"one build")
    engines = fake_engines(tiny_export, tmp_path / "e", library)

    def record(sha=None, embedded=False):
        for path in engines.glob("*.engine.json"):
            meta = json.loads(path.read_text())
            meta["plugin_library"].update(sha256=sha, embedded=embedded)
            path.write_text(json.dumps(meta))

    record(hashlib.sha256(b"another build").hexdigest())
    with pytest.raises(InputError, match=r"the plugin library it was built with \(.*lib\.so, sha256 .*\) is not there: .*lib\.so has sha256"):
        write_repository(tiny_export, tmp_path / "repo", engines_dir=engines)
    assert not (tmp_path / "repo").exists()
    record(hashlib.sha256(b"one build").hexdigest())
    repo = write_repository(tiny_export, tmp_path / "repo", engines_dir=engines)
    assert json.loads((repo / MARKER).read_text())["plugin_library"] == str(library)
    library.unlink()
    # (this host's own build of the library, if any, has another hash: not a stand-in either)
    with pytest.raises(InputError, match=r"lib\.so, sha256 .*\) is (missing: rebuild the engines|not there: .* has sha256)"):
        write_repository(tiny_export, tmp_path / "repo2", engines_dir=engines)
    record(embedded=True)  # the plans carry it: nothing to load
    assert json.loads((write_repository(tiny_export, tmp_path / "repo3", engines_dir=engines) / MARKER).read_text())["plugin_library"] is None


# ---------------------------------------------------------------------------------------------
# A real Triton server


@pytest.fixture(scope="module")
def reference(tiny_export):
    """Greedy tokens for PROMPTS from the PyTorch reference (the weights the tiny export was made from)."""
    import torch

    from qwen3next_trt.model.loader import WeightSource

    from greedy import separated_greedy

    model = WeightSource("tiny", seed=0, dtype=torch.float32).whole_model(with_mtp=False).float()
    return separated_greedy(model, PROMPTS, N_NEW)  # well separated: equality holds on any CPU


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    from qwen3next_trt.deploy.server import TritonServer

    base = tmp_path_factory.mktemp("triton")
    good = write_repository(tiny_export, base / "repo")
    # a second repository whose model points at engines, one of which disappears after writing; its
    # tensorrt_plan models make the launcher name the plugin library (a stand-in file: the wheel's
    # server has no TensorRT backend to open it)
    library = base / "libqwen3next_trt_plugins.so"
    library.write_bytes(b"")
    engines = fake_engines(tiny_export, base / "engines", plugin_library=library)
    broken = write_repository(tiny_export, base / "broken", engines_dir=engines, model_name="qwen3next_engines",
                              plan_prefix="engines")
    (engines / "layer_02.engine").unlink()
    t0 = time.monotonic()
    srv = TritonServer([good, broken], models=["qwen3next"]).start()
    srv.startup_seconds = time.monotonic() - t0
    yield srv
    srv.stop()


def generate(server, body: dict, stream: bool = False):
    """(HTTP status, parsed body or list of SSE events) from Triton's generate endpoints."""
    url = f"http://{server.http_url}/v2/models/{body.pop('model', 'qwen3next')}/generate{'_stream' if stream else ''}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if stream:
        return status, [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    return status, json.loads(text)


class Stream:
    """One gRPC bidirectional stream; `run` sends a request and collects its responses until the final flag."""

    def __init__(self, server):
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, request_id: str, ids, **scalars):
        inputs = [grpcclient.InferInput("input_ids", [len(ids)], "INT64")]
        inputs[0].set_data_from_numpy(np.array(ids, np.int64))
        types = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
                 "seed": ("INT64", np.int64), "mtp_k": ("INT32", np.int32), "stream": ("BOOL", np.bool_)}
        for name, value in scalars.items():
            t = grpcclient.InferInput(name, [1], types[name][0])
            t.set_data_from_numpy(np.array([value], types[name][1]))
            inputs.append(t)
        self.client.async_stream_infer("qwen3next", inputs, request_id=request_id, enable_empty_final_response=True)

    def collect(self, count: int, timeout: float = 120):
        """{request_id: (per-response token lists, error message or None)} for `count` requests."""
        out: dict = {}
        done = 0
        deadline = time.monotonic() + timeout
        while done < count:
            result, error = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                # an error ends its request; its id travels in the error's message context only, so
                # error tests send one request at a time
                out.setdefault("error", ([], None))
                out["error"] = ([], error.message())
                done += 1
                continue
            rid = result.get_response().id
            chunks, _ = out.setdefault(rid, ([], None))
            tokens = result.as_numpy("tokens")
            if tokens is not None:
                chunks.append(tokens.tolist())
            if result.get_response().parameters["triton_final_response"].bool_param:
                done += 1
        return out

    def close(self):
        self.client.stop_stream()
        self.client.close()


def test_server_is_ready_and_serves_the_generated_config(server):
    # the repository with tensorrt_plan models recorded the plugin library; the server was started with it
    library = Path(server.repositories[1]).parent / "libqwen3next_trt_plugins.so"
    assert f"--backend-config=tensorrt,plugins={library}" in server.command()
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("qwen3next")
    cfg = client.get_model_config("qwen3next")
    assert cfg["model_transaction_policy"]["decoupled"] is True
    assert {i["name"] for i in cfg["input"]} >= {"input_ids", "max_tokens", "temperature", "top_p", "mtp_k"}
    client.close()
    print(f"\n[deploy] tritonserver ready with the tiny model in {server.startup_seconds:.1f} s")


def test_http_generate_equals_reference_greedy(server, reference):
    for prompt, ref in zip(PROMPTS, reference):
        status, body = generate(server, {"input_ids": prompt, "max_tokens": N_NEW, "stream": False})
        assert status == 200, body
        assert body["tokens"] == ref
    # server-sent events: one event per token, in order (Triton's JSON writes a one-element tensor as a number)
    status, events = generate(server, {"input_ids": PROMPTS[1], "max_tokens": N_NEW}, stream=True)
    assert status == 200 and [e["tokens"] for e in events] == reference[1]


def test_grpc_stream_one_response_per_token(server, reference):
    s = Stream(server)
    try:
        t0 = time.monotonic()
        s.send("a", PROMPTS[0], max_tokens=N_NEW)
        got = s.collect(1)
        print(f"\n[deploy] gRPC stream, {N_NEW} tokens: {time.monotonic() - t0:.2f} s")
        assert got["a"][0] == [[t] for t in reference[0]]
        # MTP speculation is exact for greedy decoding: same tokens
        s.send("k", PROMPTS[3], max_tokens=N_NEW, mtp_k=2)
        assert sum(s.collect(1)["k"][0], []) == reference[3]
        # stream=false: one response carrying all tokens
        s.send("b", PROMPTS[2], max_tokens=N_NEW, stream=False)
        assert s.collect(1)["b"][0] == [reference[2]]
    finally:
        s.close()


def test_concurrent_requests(server, reference):
    """Several clients at once, each on its own stream (and one HTTP caller): every answer is its own reference."""
    results: dict = {}

    def grpc_worker(i):
        s = Stream(server)
        try:
            s.send(f"r{i}", PROMPTS[i], max_tokens=N_NEW)
            results[i] = sum(s.collect(1)[f"r{i}"][0], [])
        finally:
            s.close()

    def http_worker():
        results["http"] = generate(server, {"input_ids": PROMPTS[3], "max_tokens": N_NEW, "stream": False})

    t0 = time.monotonic()
    threads = [threading.Thread(target=grpc_worker, args=(i,)) for i in range(len(PROMPTS))] + [threading.Thread(target=http_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    print(f"\n[deploy] {len(threads)} concurrent requests x {N_NEW} tokens: {time.monotonic() - t0:.2f} s")
    for i, ref in enumerate(reference):
        assert results.get(i) == ref, i
    assert results["http"] == (200, {"model_name": "qwen3next", "model_version": "1", "tokens": reference[3]})


BAD = [
    ({"max_tokens": 3}, "input_ids: required"),
    ({"input_ids": []}, "input_ids: empty"),
    ({"input_ids": [1, 512]}, "token id 512 out of range"),
    ({"input_ids": [1, -3]}, "token id -3 out of range"),
    ({"input_ids": [1] * 4090, "max_tokens": 16}, "exceeds the export's context of 4096"),
    ({"input_ids": [1, 2], "mtp_k": 5}, "mtp_k: expected 0"),
    ({"input_ids": [1, 2], "mtp_k": -1}, "mtp_k: expected 0"),
    ({"input_ids": [1, 2], "max_tokens": 0}, "max_tokens: expected an integer >= 1"),
    ({"input_ids": [1, 2], "temperature": -0.5}, "temperature"),
    ({"input_ids": [1, 2], "top_p": 0.0}, "top_p"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m.split(":")[0].split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_a_400_and_the_server_keeps_serving(server, reference, body, message):
    status, answer = generate(server, dict(body, stream=False))
    assert 400 <= status < 500 and message in answer["error"], (status, answer)
    status, answer = generate(server, {"input_ids": PROMPTS[0], "max_tokens": N_NEW, "stream": False})
    assert status == 200 and answer["tokens"] == reference[0]


def test_bad_input_over_grpc_stream_is_an_error_message(server, reference):
    s = Stream(server)
    try:
        s.send("bad", [1, 9999], max_tokens=4)
        assert "token id 9999 out of range" in s.collect(1)["error"][1]
        s.send("good", PROMPTS[0], max_tokens=N_NEW)  # same stream, still serving
        assert sum(s.collect(1)["good"][0], []) == reference[0]
    finally:
        s.close()


def test_missing_engine_fails_the_load_with_its_name(server, tiny_export, reference):
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("qwen3next_engines")
        assert str(err.value.status()) == "400"
        assert "layer_02.engine: missing" in err.value.message()
        status, answer = generate(server, {"model": "qwen3next_engines", "input_ids": [1, 2], "stream": False})
        assert 400 <= status < 500 and "qwen3next_engines" in answer["error"]
        assert client.is_server_live() and client.is_model_ready("qwen3next")
        status, answer = generate(server, {"input_ids": PROMPTS[2], "max_tokens": N_NEW, "stream": False})
        assert status == 200 and answer["tokens"] == reference[2]
    finally:
        client.close()
    with pytest.raises(InputError, match="layer_02.engine: missing"):
        check_sources(tiny_export, Path(server.repositories[1]).parent / "engines")


def test_clean_shutdown(server):
    process, port = server.process, server.http_port
    t0 = time.monotonic()
    assert server.stop() == 0
    print(f"\n[deploy] tritonserver stopped in {time.monotonic() - t0:.1f} s")
    assert process.returncode == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
