"""Decode steps whose states never leave the device: ONNX Runtime IO binding, optionally CUDA graphs.

After prefill (runtime/generator.py, through the host path), `DeviceDecoder` uploads every state once
and then runs whole decode steps over OrtValues that live where the provider computes:
  - DeltaNet layers: conv and recurrent states in two fixed buffers per state (ping-pong): step s reads
    buffer s % 2 and writes the other, so no state is copied, and the addresses a step binds are one of
    two fixed sets: each layer keeps one IOBinding per parity, bound once;
  - attention layers: the decode graph concatenates past and new key/value and returns [B, Hkv, L+1, D];
    that output (allocated by ONNX Runtime on the device) is the next step's past. Its shape grows every
    step, so these graphs are never captured; position ids and the key mask [B, L+1] are host arrays
    (a few bytes) bound per step;
  - the hidden state between graphs: one fixed device buffer per graph boundary (embed -> layer 0 ->
    ... -> final); only the token ids go in and the logits come out (copied to the host once per step).
CUDA graphs (`cuda_graphs`): every fixed-shape graph of the step (embed, the DeltaNet decode graphs,
final) gets a second session with `enable_cuda_graph` (opened once per graph and kept), captured once
per parity under graph ids of this decoder's own (`gpu_graph_id`: a captured graph replays the buffer
addresses it saw) before the real states are uploaded, so warm-up and capture runs touch only zeros. A graph the provider
refuses to capture (e.g. a kernel that reads sizes back to the host) runs uncaptured; `notes` says which
and why. The batch is fixed for the whole decode (finished rows keep computing, their tokens unused):
that keeps every shape, and so every captured graph, valid.

The same code runs on the CPU provider (device values are host OrtValues there, no capture): the tests
check it token for token against the host path without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qwen3next_trt.export.manifest import DECODE, Role, layer_graph_name

CUDA_GRAPHS_ENV = "QWEN3NEXT_TRT_CUDA_GRAPHS"  # 0: the device decoder captures nothing (for comparisons)
CAPTURE_RUNS = 4  # runs per parity before the real states arrive: ONNX Runtime captures after a warm-up run


@dataclass
class StepTimes:
    """Host wall time per part of a decode step (seconds, summed over steps); `steps` counted."""
    steps: int = 0
    parts: dict = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds


class _Graph:
    """One fixed-shape graph of the step: a session (captured or not) and one IOBinding per parity
    (with its CUDA graph id when captured)."""

    def __init__(self, name: str, session, bindings: list, graph_ids: list | None):
        self.name, self.session, self.bindings, self.graph_ids = name, session, bindings, graph_ids

    @property
    def captured(self) -> bool:
        return self.graph_ids is not None

    def run(self, parity: int) -> None:
        self.session.run_bound(self.bindings[parity], self.graph_ids[parity] if self.graph_ids else None)


class DeviceDecoder:
    """Greedy/sampled decode steps for a fixed batch with every state on the session's device.

    model: a GraphModel whose sessions are OrtSessions (runtime/graph_model.py); store: its host
    StateStore after prefill, attention slots 0..past filled; past: the slots the first step sees."""

    def __init__(self, model, store, past: int, cuda_graphs: bool = True, times: StepTimes | None = None):
        check_ports(model)
        self.m, self.B, self.L = model, store.batch, past
        self.times = times
        self.notes: list[str] = []
        decode = [model.sessions[layer_graph_name(i, DECODE)] for i in range(model.n_layers)]
        self.ref = model.sessions["embed"]  # any session: makes values on the device the sessions use
        on_gpu = self.ref.device == "cuda"
        self.cuda_graphs = cuda_graphs and on_gpu
        hidden_type = decode[0].input_types["hidden"]
        H = int(next(p for p in model.records[layer_graph_name(0, DECODE)].inputs if p.name == "hidden").shape[-1])
        # hidden between graphs: h[0] = embed's output, h[i + 1] = layer i's; zeros, so that warm-up and
        # capture runs read finite values (garbage routed through a MoE could index out of range)
        zeros = np.zeros((self.B, 1, H), np.float32)
        self.h = [self.ref.device_value(hidden_type, zeros) for _ in range(model.n_layers + 1)]
        self.ids = self.ref.device_value("tensor(int64)", np.zeros((self.B, 1), np.int64))
        final = model.sessions["final"]
        V = model.manifest.vocab_size
        self.logits = final.empty_value(final.output_types["logits"], (self.B, 1, V))
        self.normed = final.empty_value(final.output_types["hidden_normed"], (self.B, 1, H))
        self.logits_host = None  # CPU staging for bf16 logits (numpy has no bf16 view of device memory)
        # states: attention -> [current past key, value] values; DeltaNet -> per state two buffers
        self.past: dict[int, list] = {}
        self.ping: dict[int, list] = {}
        for i, slots in enumerate(store.layers):
            s = decode[i]
            if store.attention[i]:
                continue
            self.ping[i] = [[s.device_value(s.input_types[sl.input], np.zeros_like(sl.buffer)),
                             s.empty_value(s.output_types[sl.output], sl.buffer.shape)] for sl in slots]
        self.graphs: dict[str, _Graph] = {}
        self._fixed("embed", model.sessions["embed"], lambda b, p: (b.bind_ortvalue_input("input_ids", self.ids),
                                                                    b.bind_ortvalue_output("hidden", self.h[0])))
        for i in range(model.n_layers):
            if not store.attention[i]:
                self._fixed(layer_graph_name(i, DECODE), decode[i], lambda b, p, i=i: self._bind_linear(b, p, i, store.layers[i]))
        self._fixed("final", final, lambda b, p: (b.bind_ortvalue_input("hidden", self.h[-1]),
                                                  b.bind_ortvalue_output("logits", self.logits),
                                                  b.bind_ortvalue_output("hidden_normed", self.normed)))
        # the real states, into the buffers the captured graphs read (addresses unchanged)
        for i, slots in enumerate(store.layers):
            s = decode[i]
            if store.attention[i]:
                self.past[i] = [s.device_value(s.input_types[sl.input], np.ascontiguousarray(sl.buffer[:, :, :past])) for sl in slots]
            else:
                for sl, pair in zip(slots, self.ping[i]):
                    s.device_value(s.input_types[sl.input], sl.buffer, into=pair[0])
        self.slots = store.layers
        self.attention = store.attention
        self.parity = 0

    # -- setup -----------------------------------------------------------------------------------
    def _bind_linear(self, b, parity: int, i: int, slots) -> None:
        b.bind_ortvalue_input("hidden", self.h[i])
        b.bind_ortvalue_output("hidden_out", self.h[i + 1])
        for sl, pair in zip(slots, self.ping[i]):
            b.bind_ortvalue_input(sl.input, pair[parity])
            b.bind_ortvalue_output(sl.output, pair[1 - parity])

    def _fixed(self, name: str, session, bind) -> None:
        """A fixed-shape graph: bindings for both parities, captured as CUDA graphs when asked and possible."""
        if self.cuda_graphs:
            try:
                graph_session = session.graph_sibling()
                bindings = self._bindings(graph_session, bind)
                ids = graph_session.new_graph_ids(2)  # this decoder's buffers: graphs of their own
                for parity in (0, 1):
                    for _ in range(CAPTURE_RUNS):
                        graph_session.run_bound(bindings[parity], ids[parity])
                self.graphs[name] = _Graph(name, graph_session, bindings, ids)
                return
            except Exception as e:  # noqa: BLE001 - the provider's refusal is the reason we report
                self.notes.append(f"{name}: not captured as a CUDA graph ({str(e).strip().splitlines()[0][:200]}); runs uncaptured")
        self.graphs[name] = _Graph(name, session, self._bindings(session, bind), None)

    @staticmethod
    def _bindings(session, bind) -> list:
        out = []
        for parity in (0, 1):
            b = session.session.io_binding()
            bind(b, parity)
            out.append(b)
        return out

    @property
    def captured(self) -> list[str]:
        return [n for n, g in self.graphs.items() if g.captured]

    # -- one step --------------------------------------------------------------------------------
    def step(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One decode step for every row: tokens [B], positions [B], key mask [B, L+1] (the new slot
        included). Returns logits [B, V] on the host (float32 for bf16 exports)."""
        import time

        clock = time.perf_counter
        t = clock()
        self.ids.update_inplace(np.ascontiguousarray(tokens, dtype=np.int64).reshape(self.B, 1))
        p = self.parity
        self.graphs["embed"].run(p)
        self._time("embed", t)
        pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(self.B, 1)
        mask = np.ascontiguousarray(mask, dtype=np.bool_)
        for i in range(self.m.n_layers):
            t = clock()
            if self.attention[i]:
                self._attention(i, pos, mask)
                self._time("attention layers", t)
            else:
                self.graphs[layer_graph_name(i, DECODE)].run(p)
                self._time("DeltaNet layers", t)
        t = clock()
        self.graphs["final"].run(p)
        final = self.m.sessions["final"]
        if self.logits_host is None and self.logits.device_name().lower() != "cpu":
            self.logits_host = self.ref._ort.OrtValue.ortvalue_from_shape_and_type(self.logits.shape(), _element(self.logits.data_type()), "cpu", 0)
        logits = np.array(final.to_host(self.logits, self.logits_host))  # a copy: the buffer is the next step's
        self._time("final + logits to host", t)
        self.parity = 1 - p
        self.L += 1
        if self.times is not None:
            self.times.steps += 1
        return logits[:, 0]

    def _attention(self, i: int, positions: np.ndarray, mask: np.ndarray) -> None:
        s = self.m.sessions[layer_graph_name(i, DECODE)]
        b = s.session.io_binding()
        b.bind_ortvalue_input("hidden", self.h[i])
        b.bind_ortvalue_output("hidden_out", self.h[i + 1])
        for sl, value in zip(self.slots[i], self.past[i]):
            b.bind_ortvalue_input(sl.input, value)
            b.bind_output(sl.output, s.value_device)  # [B, Hkv, L+1, D]: allocated by the provider
        for port in s.session.get_inputs():
            if port.name == "position_ids":
                b.bind_cpu_input(port.name, positions)
            elif port.name == "attention_mask":
                b.bind_cpu_input(port.name, mask)
        s.run_bound(b)
        outs = dict(zip(s.output_names, b.get_outputs()))
        self.past[i] = [outs[sl.output] for sl in self.slots[i]]

    def _time(self, part: str, t0: float) -> None:
        if self.times is not None:
            import time

            self.times.add(part, time.perf_counter() - t0)

    def state(self, layer: int) -> list[np.ndarray]:
        """The layer's current states on the host (tests): whole DeltaNet states, or key/value slots 0..L."""
        s = self.m.sessions[layer_graph_name(layer, DECODE)]
        values = self.past[layer] if self.attention[layer] else [pair[self.parity] for pair in self.ping[layer]]
        return [s.to_host(v) for v in values]


def _element(ort_type: str) -> int:
    from qwen3next_trt.sessions import ONNX_ELEMENT

    return ONNX_ELEMENT[ort_type]


def cuda_graphs_default() -> bool:
    import os

    return os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"


def device_resident(model) -> bool:
    """True when every session of `model` is an ONNX Runtime session on the CUDA provider: then decode
    runs through DeviceDecoder (the states stay on the GPU)."""
    from qwen3next_trt.sessions import OrtSession

    sessions = getattr(model, "sessions", None)  # a model that opens no sessions of its own: the host path
    return bool(sessions) and all(isinstance(s, OrtSession) and s.device == "cuda" for s in sessions.values())


def check_ports(model) -> None:
    """The ports DeviceDecoder binds by name, checked against the manifest before a step runs."""
    for i in range(model.n_layers):
        rec = model.records[layer_graph_name(i, DECODE)]
        names = {p.name for p in rec.inputs} | {o.name for o in rec.outputs}
        need = {"hidden", "hidden_out"} | ({"position_ids", "attention_mask"} if rec.is_attention else set())
        missing = need - names
        if missing:
            raise ValueError(f"{rec.name}: ports {sorted(missing)} missing: the device decoder binds them by name")
        if not rec.is_attention and any(p.role == Role.STATE_IN and p.grows for p in rec.inputs):
            raise ValueError(f"{rec.name}: a growing state in a DeltaNet graph: the device decoder expects fixed shapes")
