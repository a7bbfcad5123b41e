"""Start and stop the `tritonserver` that the nvidia-pytriton wheel ships, on loopback, for a repository.

The server runs from a separate Python environment (`.venv/triton`, made by setup.sh): the wheel's
Python backend needs numpy 1.x, the project's environment has numpy 2.x. Three things make the
wheel's binary usable outside pytriton itself, each measured on the dev machine:
- its shared libraries live in `nvidia_pytriton.libs/` (LD_LIBRARY_PATH), and the Python backend
  stub links `libpython3.X.so.1.0`, which must be the environment's base interpreter's (its LIBDIR);
- the stub for the environment's Python version must sit next to `libtriton_python.so`, so each
  server gets its own backend folder (a copy) in a temporary workspace;
- the stub embeds Python in isolated mode (PYTHONPATH and PYTHONHOME are ignored) and finds its
  prefix through `python3` on PATH: with the environment's `bin` first on PATH, the embedded
  interpreter takes the venv's site-packages (numpy 1.x, onnxruntime, this project).

    with TritonServer(["out/repo"]) as server:      # ready when this returns
        server.http_url, server.grpc_url

A repository with `tensorrt_plan` models (deploy --engines) records the C++ plugin library their plans
need; the server gets `--backend-config=tensorrt,plugins=<it>` (the pytriton wheel has no TensorRT
backend, so those models load only on a full Triton).

`python -m qwen3next_trt.deploy.server --repo out/repo` serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from qwen3next_trt.errors import InputError

from .repository import MARKER, MODEL_NAME

ENV_VAR = "QWEN3NEXT_TRITON_ENV"


def find_triton_env(env_dir=None) -> Path:
    """The Python environment holding nvidia-pytriton: argument, $QWEN3NEXT_TRITON_ENV, or <this venv>/triton."""
    candidates = [Path(env_dir)] if env_dir else [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else [Path(sys.prefix) / "triton"]
    env = candidates[0]
    if not (env / "bin" / "python").exists():
        raise InputError(f"{env}: no Triton environment (python with nvidia-pytriton and numpy<2); `bash setup.sh` makes "
                         f"one in .venv/triton, or point {ENV_VAR} at one")
    return env


class ServerLayout:
    """Where the wheel keeps the server, its libraries and the stubs, for one environment."""

    def __init__(self, env: Path):
        # find_spec, not import: pytriton's own Python API needs packages this environment leaves out
        probe = subprocess.run(
            [str(env / "bin" / "python"), "-c",
             "import json, sys, sysconfig, importlib.util, numpy; "
             "print(json.dumps({'pytriton': importlib.util.find_spec('pytriton').submodule_search_locations[0], "
             "'libdir': sysconfig.get_config_var('LIBDIR'), 'version': '%d.%d' % sys.version_info[:2], 'numpy': numpy.__version__}))"],
            capture_output=True, text=True)
        if probe.returncode != 0:
            raise InputError(f"{env}: cannot import pytriton and numpy there ({probe.stderr.strip().splitlines()[-1:]}); "
                             "install with `pip install --no-deps nvidia-pytriton==0.7.0 'numpy<2' onnxruntime`")
        info = json.loads(probe.stdout)
        if int(info["numpy"].split(".")[0]) >= 2:
            raise InputError(f"{env}: numpy {info['numpy']}; Triton's Python backend in the pytriton wheel needs numpy<2 "
                             "(with 2.x every response fails: 'output tensor shape does not match size of output')")
        self.env = env
        root = Path(info["pytriton"]) / "tritonserver"
        self.binary = root / "bin" / "tritonserver"
        self.python_backend = root / "backends" / "python"
        self.stub = root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        self.libs = Path(info["pytriton"]).parent / "nvidia_pytriton.libs"
        self.libpython_dir = info["libdir"]
        for path in (self.binary, self.python_backend / "libtriton_python.so", self.stub, self.libs):
            if not path.exists():
                raise InputError(f"{path}: missing from the nvidia-pytriton install in {env} (Python {info['version']})")


def _die_with_parent():
    # Runs in the child before exec: if the process that started the server dies without stopping
    # it (a killed test run), the kernel sends the server SIGTERM instead of leaving it on its ports.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plugin_libraries(repositories) -> list[str]:
    """The C++ plugin libraries the repositories' tensorrt_plan models need (recorded by `deploy`)."""
    out = []
    for repo in repositories:
        try:
            path = json.loads((Path(repo) / MARKER).read_text()).get("plugin_library")
        except (OSError, ValueError, AttributeError):
            continue  # not written by `deploy`: nothing recorded
        if not path:
            continue
        if not Path(path).is_file():
            raise InputError(f"{path}: the C++ plugin library that the tensorrt_plan models of {repo} need is missing "
                             "(`qwen3next-trt plugin-library` builds it; then `qwen3next-trt deploy` again)")
        if path not in out:
            out.append(path)
    return out


class TritonServer:
    def __init__(self, repositories, models=(MODEL_NAME,), env_dir=None, http_port=None, grpc_port=None,
                 startup_timeout: float = 180.0, verbose: bool = False):
        self.repositories = [Path(r).resolve() for r in ([repositories] if isinstance(repositories, (str, Path)) else repositories)]
        for repo in self.repositories:
            if not repo.is_dir():
                raise InputError(f"{repo}: model repository missing")
        self.models = list(models)
        self.plugin_libraries = plugin_libraries(self.repositories)
        self.layout = ServerLayout(find_triton_env(env_dir))
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.startup_timeout, self.verbose = startup_timeout, verbose
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workspace / "tritonserver.log"

    def log_tail(self, lines: int = 40) -> str:
        if self.workspace is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def command(self) -> list[str]:
        cmd = [str(self.layout.binary)]
        cmd += [f"--model-repository={r}" for r in self.repositories]
        cmd += [
            f"--backend-directory={self.workspace / 'backends'}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false", "--allow-gpu-metrics=false",
            # explicit: a repository may hold tensorrt_plan entries this host has no backend for
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models],
            # a model that fails to load must not take the server (and its other models) down
            "--exit-on-error=false",
            # the Python backend's shared-memory regions are named by this: unique per server
            f"--backend-config=python,shm-region-prefix-name=q3n{os.getpid()}_{self.http_port}_",
            "--exit-timeout-secs=20",
        ]
        if self.plugin_libraries:
            # tensorrt_plan models name their plugins only: the TensorRT backend dlopens these at start
            cmd.append(f"--backend-config=tensorrt,plugins={';'.join(self.plugin_libraries)}")
        if self.verbose:
            cmd.append("--log-verbose=1")
        return cmd

    def environment(self) -> dict:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.layout.libs), self.layout.libpython_dir, env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join([str(self.layout.env / "bin"), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        return env

    def start(self) -> "TritonServer":
        self.workspace = Path(tempfile.mkdtemp(prefix="qwen3next-triton-"))
        backend = self.workspace / "backends" / "python"
        shutil.copytree(self.layout.python_backend, backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.layout.stub, backend / "triton_python_backend_stub")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.workspace, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        try:
            self._wait_live()
            for model in self.models:
                if not self.model_ready(model):
                    raise InputError(f"model {model!r} did not load: {self.model_reason(model) or 'see ' + str(self.log_path)}")
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_live(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if self._get("/v2/health/live")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not live after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def model_ready(self, model: str) -> bool:
        return self._get(f"/v2/models/{model}/ready")[0] == 200

    def model_reason(self, model: str) -> str:
        status, body = self._get("/v2/repository/index", method="POST")
        if status != 200:
            return ""
        return "; ".join(e.get("reason", "") for e in json.loads(body) if e.get("name") == model)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads its models, calling finalize), SIGKILL after `timeout`; the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            self.process = None
        if self.workspace is not None and not self.verbose:
            shutil.rmtree(self.workspace / "backends", ignore_errors=True)
        return code

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwen3next_trt.deploy.server",
                                 description="serve a repository written by `qwen3next-trt deploy` with the pytriton wheel's tritonserver (loopback)")
    ap.add_argument("--repo", action="append", required=True, help="model repository (repeatable)")
    ap.add_argument("--model", action="append", help=f"model to load (repeatable; default {MODEL_NAME})")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--env", help=f"Triton Python environment (default ${ENV_VAR} or <venv>/triton)")
    args = ap.parse_args(argv)
    try:
        server = TritonServer(args.repo, args.model or [MODEL_NAME], args.env, args.http_port, args.grpc_port).start()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}; log {server.log_path}; Ctrl-C stops it", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    return server.stop() or 0


if __name__ == "__main__":
    sys.exit(main())
