"""Triton Python-backend model `qwen3next`: token ids in, generated token ids streamed out.

`write_repository` copies this file to `<repo>/qwen3next/1/model.py`; it runs inside Triton's
Python backend stub, never in the project's own process. The model is decoupled: each request gets
one response per generated token (`stream` true, the default) or one response with all tokens
(`stream` false, which is what Triton's HTTP `generate` endpoint needs), then the final flag.

Requests are queued by `execute` and served by one worker thread, so `execute` returns at once and
requests that arrive while a generation runs are batched into the next one.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3next_trt.deploy.repository import check_sources
from qwen3next_trt.errors import InputError
from qwen3next_trt.runtime import Generator, SamplingParams

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class Job:
    sender: object
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_tokens: tuple[int, ...]
    mtp_k: int
    stream: bool
    produced: list[int] = field(default_factory=list)
    done: bool = False

    def batch_key(self):
        # Sampled requests never share a batch: their seed must give the same tokens whatever
        # else is in flight. Greedy requests with the same limits batch freely.
        if self.temperature != 0.0:
            return ("alone", id(self))
        return (self.max_tokens, self.stop_tokens, self.mtp_k)


def _scalar(request, name, default, kind):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InputError(f"{name}: expected one value, got {values.size}")
    return kind(values[0])


def _as_request_fields(message: str) -> str:
    # The runtime names its own arguments (prompt 0, max_new_tokens); a client knows the inputs.
    return re.sub(r"^prompt 0: ", "input_ids: ", message).replace("max_new_tokens", "max_tokens")


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        onnx_dir, engines_dir = params["onnx_dir"], params.get("engines_dir") or None
        # The repository may have been written long before the server starts: check the files it
        # points at first, so a missing engine fails the load with its name, not deep inside a runtime.
        check_sources(onnx_dir, engines_dir)
        self.default_max_tokens = int(params.get("default_max_tokens", "16"))
        self.batch_window = float(params.get("batch_window_ms", "10")) / 1000.0
        self.generator = Generator(onnx_dir, engines_dir=engines_dir)
        self.jobs: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, name="qwen3next-generate", daemon=True)
        self.worker.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.jobs.put(self._parse(request, sender))
            except InputError as e:
                self._fail(sender, str(e))
        return None

    def finalize(self):
        self.jobs.put(None)
        self.worker.join(timeout=30)

    # -- request handling -------------------------------------------------------------------------

    def _parse(self, request, sender) -> Job:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids is None:  # Triton's generate endpoint let such a request through (seen)
            raise InputError("input_ids: required (INT64 [n], the prompt's token ids)")
        ids = ids.as_numpy().reshape(-1)
        stop = pb_utils.get_input_tensor_by_name(request, "stop_tokens")
        job = Job(
            sender=sender,
            prompt=[int(t) for t in ids],
            max_tokens=_scalar(request, "max_tokens", self.default_max_tokens, int),
            temperature=_scalar(request, "temperature", 0.0, float),
            top_p=_scalar(request, "top_p", 1.0, float),
            seed=_scalar(request, "seed", 0, int),
            stop_tokens=tuple(int(t) for t in stop.as_numpy().reshape(-1)) if stop is not None else (),
            mtp_k=_scalar(request, "mtp_k", 0, int),
            stream=_scalar(request, "stream", True, bool),
        )
        return job

    @staticmethod
    def _fail(sender, message, internal=False):
        # TritonError is injected into pb_utils by the stub at run time, not at import time.
        code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)

    @staticmethod
    def _tokens(tokens):
        return pb_utils.InferenceResponse([pb_utils.Tensor("tokens", np.asarray(tokens, dtype=np.int64))])

    def _serve(self):
        while True:
            first = self.jobs.get()
            if first is None:
                return
            pending = [first]
            # Generation runs one batch at a time (no joining a running batch), so clients that
            # arrive a few ms apart would otherwise wait for the whole first generation.
            deadline = time.monotonic() + self.batch_window
            while True:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._run_groups(pending)
                    return
                pending.append(job)
            self._run_groups(pending)

    def _run_groups(self, jobs):
        groups: dict = {}
        for job in jobs:
            groups.setdefault(job.batch_key(), []).append(job)
        for group in groups.values():
            self._run(group)

    def _run(self, group):
        lead = group[0]
        sampling = SamplingParams(temperature=lead.temperature, top_p=lead.top_p, seed=lead.seed)
        started = False
        try:
            events = self.generator.stream([j.prompt for j in group], max_new_tokens=lead.max_tokens,
                                           sampling=sampling, stop_tokens=lead.stop_tokens, mtp_k=lead.mtp_k)
            for ev in events:
                started = True
                job = group[ev.request]
                if job.done:
                    continue
                job.produced.append(ev.token)
                if job.stream:
                    job.sender.send(self._tokens([ev.token]))
                if ev.finished:
                    self._finish(job)
                # Never ask a sender after its final response: the server frees it (segfault seen).
                elif job.sender.is_cancelled():
                    job.done = True
                    job.sender.send(flags=FINAL)
                if all(j.done for j in group):
                    break
        except InputError as e:
            if not started and len(group) > 1:
                # The runtime validates a batch as a whole; rerun one by one so that only the bad
                # request gets the error and the others still get their tokens.
                for job in group:
                    self._run([job])
                return
            for job in group:
                if not job.done:
                    job.done = True
                    self._fail(job.sender, _as_request_fields(str(e)))
            return
        except Exception as e:  # a bug or a runtime failure: report it, keep serving
            for job in group:
                if not job.done:
                    job.done = True
                    self._fail(job.sender, f"generation failed: {type(e).__name__}: {e}", internal=True)
            return
        for job in group:
            if not job.done:
                self._finish(job)

    def _finish(self, job):
        job.done = True
        if job.stream:
            job.sender.send(flags=FINAL)
        else:
            job.sender.send(self._tokens(job.produced), flags=FINAL)
