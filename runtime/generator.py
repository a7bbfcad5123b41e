"""Generation over the exported per-layer graphs: prefill, decode, sampling, streaming, MTP speculation.

Batching: requests of different lengths share one batch. Each prompt is prefilled without padding
(prompts of equal length together), so no pad token ever enters a DeltaNet state; its key/value slots
are right-aligned in the shared attention slots and a per-row key mask hides the slots before it.
Decode steps then run all unfinished rows together; a finished row simply leaves the active set.

Speculative decoding (greedy only) with the MTP head, k drafts per round:
  1. the MTP layer runs over the positions committed last round (h_t from the main model's final
     norm, x_{t+1} the committed tokens) and its last output gives draft 1; drafts 2..k chain the MTP
     layer on its own output (those speculative MTP slots are dropped after the round);
  2. the main model verifies [pending, d1..dk] in one pass of the prefill graphs (T = k+1);
  3. the longest prefix of drafts that equals the main model's argmax is accepted, plus the main
     model's own next token. Attention slots of rejected drafts are masked out; the DeltaNet layers'
     states are rolled back exactly by re-running only those layers on the accepted prefix of the
     inputs they saw in the verify pass, from a snapshot taken before it.
The output is therefore the plain greedy output token for token (tests check it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen3next_trt.errors import InputError, NumericalError

from qwen3next_trt.export.manifest import Manifest
from qwen3next_trt.sessions import engine_factory, onnxrt_factory

from .graph_model import GraphModel
from .sampling import SamplingParams, choose

MAX_DRAFTS = 4


@dataclass
class TokenEvent:
    request: int  # index into the prompts
    token: int
    finished: bool  # the request's last token (stop token or max_new_tokens)
    logits: np.ndarray | None = None  # [V], the logits the token was chosen from (keep_logits=True)


@dataclass
class GenerationStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    main_passes: int = 0  # passes of the main model after prefill (decode steps or verify passes)
    row_passes: int = 0  # the same, counted once per request in the pass
    drafted: list[int] = field(default_factory=list)  # per draft position: drafts proposed
    accepted: list[int] = field(default_factory=list)  # per draft position: drafts accepted
    rollback_layer_runs: int = 0  # DeltaNet layer graphs re-run to roll states back
    # decode through runtime/device.py (states on the device): its setup (uploads, CUDA-graph captures),
    # the steps after it, and the graphs captured / notes on those that could not be
    device_resident: bool = False
    decode_setup_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    cuda_graphs: list[str] = field(default_factory=list)
    device_notes: list[str] = field(default_factory=list)
    step_parts_s: dict = field(default_factory=dict)

    @property
    def acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_main_pass(self) -> float:
        """Tokens a request gains per main-model pass it takes part in (1 without speculation; the
        first token, which comes from prefill, not counted)."""
        after_first = self.generated_tokens - self.requests
        return after_first / self.row_passes if self.row_passes else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "time_to_first_token_s": self.time_to_first_token_s, "total_s": self.total_s,
                "main_passes": self.main_passes, "row_passes": self.row_passes, "tokens_per_main_pass": self.tokens_per_main_pass,
                "acceptance_per_position": self.acceptance, "rollback_layer_runs": self.rollback_layer_runs,
                "device_resident": self.device_resident, "decode_setup_s": self.decode_setup_s, "decode_s": self.decode_s,
                "decode_steps": self.decode_steps, "cuda_graphs": self.cuda_graphs, "device_notes": self.device_notes,
                "step_parts_s": self.step_parts_s}


class Generator:
    """Generation over one export. `engines_dir` runs TensorRT engines instead of ONNX Runtime.

    device_resident: decode steps through runtime/device.py (states stay on the device, IO binding);
    None: whenever every session is ONNX Runtime on the CUDA provider; True also runs it on the CPU
    provider (tests). Speculation (mtp_k > 0) keeps the host path. cuda_graphs: capture the step's
    fixed-shape graphs there (default: on, unless $QWEN3NEXT_TRT_CUDA_GRAPHS=0). step_times: time each
    part of a device step (host clock around each session call)."""

    def __init__(self, onnx_dir: str | Path, engines_dir: str | Path | None = None, session_factory=None,
                 threads: int | None = None, prefill_chunk: int | None = None, mtp: bool | None = None, device: str = "cpu",
                 device_resident: bool | None = None, cuda_graphs: bool | None = None, step_times: bool = False):
        from .device import cuda_graphs_default, device_resident as all_on_cuda

        manifest = Manifest.load(onnx_dir)
        if session_factory is None:
            session_factory = engine_factory(engines_dir, manifest) if engines_dir is not None else onnxrt_factory(onnx_dir, threads, device)
        self.model = GraphModel(onnx_dir, session_factory, manifest, mtp=mtp)
        self.vocab_size = self.model.manifest.vocab_size
        self.max_context = self.model.manifest.context_limit
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError(f"prefill_chunk: expected a positive number of tokens, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.device_resident = all_on_cuda(self.model) if device_resident is None else device_resident
        self.cuda_graphs = cuda_graphs_default() if cuda_graphs is None else cuda_graphs
        self.step_times = step_times
        self.last_stats = GenerationStats()

    @property
    def mtp_available(self) -> bool:
        return self.model.has_mtp

    # -- checks ----------------------------------------------------------------------------------
    def check_request(self, prompts, max_new_tokens: int, sampling: SamplingParams, stop_tokens, mtp_k: int) -> None:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("prompts: expected a non-empty list of token-id lists")
        for r, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {r}: empty: expected at least one token id")
            bad = [t for t in p if not (isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size)]
            if bad:
                raise InputError(f"prompt {r}: token id {bad[0]!r} out of range: expected 0 <= id < {self.vocab_size} (vocab_size)")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        sampling.check()
        if not isinstance(mtp_k, (int, np.integer)) or not 0 <= mtp_k <= MAX_DRAFTS:
            raise InputError(f"mtp_k: expected 0 (no speculation) .. {MAX_DRAFTS} draft tokens, got {mtp_k!r}")
        if mtp_k and not self.mtp_available:
            raise InputError(f"mtp_k={mtp_k}: this export has no MTP graphs (mtp.prefill, mtp.decode, lm_head)")
        if mtp_k and not sampling.greedy:
            raise InputError(f"mtp_k={mtp_k}: speculative decoding is greedy only here (temperature 0), got temperature {sampling.temperature}")
        bad = [t for t in stop_tokens if not (isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size)]
        if bad:
            raise InputError(f"stop_tokens: token id {bad[0]!r} out of range: expected 0 <= id < {self.vocab_size}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens + mtp_k > self.max_context:
            raise InputError(f"prompt length {longest} + max_new_tokens {max_new_tokens}"
                             f"{f' + mtp_k {mtp_k}' if mtp_k else ''} exceeds the export's context of {self.max_context} "
                             "positions (export --max-positions)")

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 32, sampling: SamplingParams | None = None, stop_tokens=(),
                 mtp_k: int = 0) -> list[list[int]]:
        """New tokens per prompt (a stop token, when hit, is the last one)."""
        out = [[] for _ in prompts]
        for ev in self.stream(prompts, max_new_tokens, sampling, stop_tokens, mtp_k):
            out[ev.request].append(ev.token)
        return out

    def stream(self, prompts, max_new_tokens: int = 32, sampling: SamplingParams | None = None, stop_tokens=(),
               mtp_k: int = 0, keep_logits: bool = False) -> Iterator[TokenEvent]:
        """Tokens as they are decided, one TokenEvent each; `last_stats` is complete when it ends."""
        sampling = sampling or SamplingParams()
        stop_tokens = tuple(stop_tokens)
        self.check_request(prompts, max_new_tokens, sampling, stop_tokens, mtp_k)
        run = _Run(self, [list(map(int, p)) for p in prompts], int(max_new_tokens), sampling, set(stop_tokens),
                   int(mtp_k), keep_logits)
        self.last_stats = run.stats
        yield from run.events()


class _Run:
    """The state of one generate call."""

    def __init__(self, gen: Generator, prompts, max_new: int, sampling: SamplingParams, stop: set, k: int, keep_logits: bool):
        self.m, self.prompts, self.max_new, self.sampling, self.stop, self.k = gen.model, prompts, max_new, sampling, stop, k
        self.prefill_chunk = gen.prefill_chunk
        self.keep_logits = keep_logits
        self.gen = gen
        B = len(prompts)
        self.lengths = np.array([len(p) for p in prompts])
        self.L0 = int(self.lengths.max())
        # decode uses one attention slot per step, a speculative round k+1
        self.store = self.m.new_store(B, self.L0 + max_new * (k + 1) + 1)
        self.rngs = [sampling.rng(r) for r in range(B)]
        self.produced = np.zeros(B, np.int64)
        self.done = np.zeros(B, bool)
        self.pending = np.zeros(B, np.int64)  # the last chosen token, not yet fed to the main model
        self.pos = self.lengths.copy()  # its position
        self.stats = GenerationStats(requests=B, prompt_tokens=int(self.lengths.sum()), drafted=[0] * k, accepted=[0] * k)

    def _emit(self, r: int, token: int, logits: np.ndarray) -> TokenEvent:
        self.produced[r] += 1
        self.stats.generated_tokens += 1
        self.done[r] = token in self.stop or self.produced[r] >= self.max_new
        return TokenEvent(r, int(token), bool(self.done[r]), logits.copy() if self.keep_logits else None)

    def _check_finite(self, logits: np.ndarray, rows) -> None:
        """logits [n, T, V] (or [n, V]) of `rows`. NaN logits would pass argmax as token 0 and break
        sampling's probabilities, so stop here and say where."""
        if np.isfinite(logits).all():
            return
        flat = logits.reshape(len(rows), -1)
        j = int(np.flatnonzero(~np.isfinite(flat).all(1))[0])
        raise NumericalError(
            f"{self.m.dir}: logits of request {int(rows[j])} are not finite ({int((~np.isfinite(flat[j])).sum())} NaN/Inf values) "
            f"after {int(self.produced[rows[j]])} generated token(s): the export ({self.m.manifest.dtype}) overflows or "
            "its weights hold NaN/Inf; stopped instead of emitting a token")

    def _active(self) -> np.ndarray:
        return np.flatnonzero(~self.done)

    def events(self) -> Iterator[TokenEvent]:
        t0 = time.perf_counter()
        last_logits, prompt_normed = self._prefill()
        self._check_finite(last_logits, np.arange(len(self.prompts)))
        for r in range(len(self.prompts)):
            self.pending[r] = choose(last_logits[r], self.sampling, self.rngs[r])
        self.stats.time_to_first_token_s = time.perf_counter() - t0
        for r in range(len(self.prompts)):
            yield self._emit(r, self.pending[r], last_logits[r])
        steps = self._speculate(prompt_normed) if self.k else self._decode_device() if self.gen.device_resident else self._decode()
        yield from steps
        self.stats.total_s = time.perf_counter() - t0

    def _prefill(self):
        """Every prompt through the prefill graphs, equal lengths together, right-aligned in the slots."""
        V = self.m.manifest.vocab_size
        last_logits = np.zeros((len(self.prompts), V), np.float32)
        normed_of = {}
        by_length = defaultdict(list)
        for r, n in enumerate(self.lengths):
            by_length[int(n)].append(r)
        for n, rows in sorted(by_length.items()):
            rows = np.array(rows)
            ids = np.array([self.prompts[r] for r in rows], np.int64)
            start = self.L0 - n
            self.store.mask[rows, start : self.L0] = True
            chunk = self.prefill_chunk or n
            parts = []
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                positions = np.broadcast_to(np.arange(a, b), (len(rows), b - a))
                logits, normed, _ = self.m.forward(ids[:, a:b], self.store, rows, positions, (start, start + a), "prefill")
                if self.k:
                    parts.append(normed)
            last_logits[rows] = logits[:, -1]
            if self.k:
                normed = np.concatenate(parts, 1)
                normed_of.update({r: normed[j] for j, r in enumerate(rows)})
        self.L = self.L0
        return last_logits, normed_of

    def _decode(self) -> Iterator[TokenEvent]:
        while not self.done.all():
            rows = self._active()
            self.store.mask[rows, self.L] = True
            logits, _, _ = self.m.forward(self.pending[rows][:, None], self.store, rows, self.pos[rows][:, None], (0, self.L), "decode")
            self._check_finite(logits[:, -1], rows)
            self.L += 1
            self.pos[rows] += 1
            self.stats.main_passes += 1
            self.stats.row_passes += len(rows)
            for j, r in enumerate(rows):
                self.pending[r] = choose(logits[j, -1], self.sampling, self.rngs[r])
                yield self._emit(r, self.pending[r], logits[j, -1])

    def _decode_device(self) -> Iterator[TokenEvent]:
        """Decode steps with the states on the device (runtime/device.py): every row computes every step
        (fixed shapes), finished rows' tokens are dropped; only logits come back."""
        from .device import DeviceDecoder, StepTimes

        if self.done.all():
            return
        t0 = time.perf_counter()
        times = StepTimes() if self.gen.step_times else None
        dec = DeviceDecoder(self.m, self.store, self.L, cuda_graphs=self.gen.cuda_graphs, times=times)
        st = self.stats
        st.device_resident, st.cuda_graphs, st.device_notes = True, dec.captured, dec.notes
        st.decode_setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while not self.done.all():
            rows = self._active()
            self.store.mask[:, self.L] = True
            logits = dec.step(self.pending, self.pos, self.store.mask[:, : self.L + 1])[rows]
            self._check_finite(logits, rows)
            self.L += 1
            self.pos += 1
            st.main_passes += 1
            st.row_passes += len(rows)
            st.decode_steps += 1
            for j, r in enumerate(rows):
                self.pending[r] = choose(logits[j], self.sampling, self.rngs[r])
                yield self._emit(r, self.pending[r], logits[j])
            st.decode_s = time.perf_counter() - t0
            if times is not None:
                st.step_parts_s = dict(times.parts)

    def _speculate(self, prompt_normed: dict) -> Iterator[TokenEvent]:
        k, m, store = self.k, self.m, self.store
        B = len(self.prompts)
        self.mtp_store = m.new_mtp_store(B, self.L0 + self.max_new * (k + 1) + k)
        self.Lm = 0
        # what the MTP layer has not seen yet, per row: positions from `mtp_start`, their normed
        # hidden states, and the tokens that follow them
        self.mtp_start = np.zeros(B, np.int64)
        self.mtp_hidden = {r: prompt_normed[r] for r in range(B)}
        self.mtp_next = {r: self.prompts[r][1:] + [int(self.pending[r])] for r in range(B)}
        linear = [i for i in range(m.n_layers) if not m.is_attention[i]]
        while not self.done.all():
            rows = self._active()
            n = len(rows)
            D = self._draft(rows)
            # verify [pending, d1..dk] in one main-model pass
            ids = np.concatenate([self.pending[rows][:, None], D], 1)
            positions = self.pos[rows][:, None] + np.arange(k + 1)[None, :]
            store.mask[rows, self.L : self.L + k + 1] = True
            snap = store.snapshot(linear, rows)
            logits, normed, kept = m.forward(ids, store, rows, positions, (0, self.L), "prefill", keep_linear_inputs=True)
            self.stats.main_passes += 1
            self.stats.row_passes += n
            self._check_finite(logits, rows)
            targets = logits.argmax(-1)
            accepted = np.cumprod(D == targets[:, :k], axis=1).sum(1)
            for j in range(k):
                self.stats.drafted[j] += n
                self.stats.accepted[j] += int((accepted > j).sum())
            # roll back what the rejected drafts wrote
            for a in np.unique(accepted):
                if a == k:
                    continue
                g = np.flatnonzero(accepted == a)
                store.restore(snap, rows[g], g)
                for i in linear:
                    m.layer(i, "prefill", np.ascontiguousarray(kept[i][g, : a + 1]), store, rows[g], None, (0, 0), int(a + 1))
                self.stats.rollback_layer_runs += len(linear)
                store.mask[rows[g], self.L + a + 1 : self.L + k + 1] = False
            self.L += int(accepted[0]) + 1 if (accepted == accepted[0]).all() else k + 1
            for j, r in enumerate(rows):
                a = int(accepted[j])
                toks = [int(t) for t in D[j, :a]] + [int(targets[j, a])]
                for i, t in enumerate(toks):
                    if self.done[r]:
                        break
                    yield self._emit(r, t, logits[j, i])
                self.mtp_start[r], self.mtp_hidden[r], self.mtp_next[r] = self.pos[r], normed[j, : a + 1], toks
                self.pos[r] += a + 1
                self.pending[r] = toks[-1]

    def _draft(self, rows: np.ndarray) -> np.ndarray:
        """k draft tokens [n, k] per active row from the MTP layer."""
        m, k, ms = self.m, self.k, self.mtp_store
        n = len(rows)
        # MTP over the newly committed positions (ragged: each row's real tokens first; the padding
        # after them is never seen by a real query, and is masked afterwards)
        counts = np.array([len(self.mtp_next[r]) for r in rows])
        Tm = int(counts.max())
        ids = np.zeros((n, Tm), np.int64)
        hid = np.zeros((n, Tm, self.mtp_hidden[rows[0]].shape[-1]), self.mtp_hidden[rows[0]].dtype)
        for j, r in enumerate(rows):
            ids[j, : counts[j]] = self.mtp_next[r]
            hid[j, : counts[j]] = self.mtp_hidden[r]
        ms.mask[rows, self.Lm : self.Lm + Tm] = True
        positions = self.mtp_start[rows][:, None] + np.arange(Tm)[None, :]
        h = m.mtp(ids, hid, ms, rows, positions, (0, self.Lm), "prefill")
        ms.mask[rows, self.Lm : self.Lm + Tm] = np.arange(Tm)[None, :] < counts[:, None]
        self.Lm += Tm
        prev = h[np.arange(n), counts - 1][:, None]
        drafts = [m.lm_head(prev)[:, 0].argmax(-1)]
        # drafts 2..k: the MTP layer on its own output, in slots that are dropped after the round
        for j in range(1, k):
            ms.mask[rows, self.Lm + j - 1] = True
            prev = m.mtp(drafts[-1][:, None], prev, ms, rows, (self.pos[rows] + j - 1)[:, None], (0, self.Lm + j - 1), "decode")
            drafts.append(m.lm_head(prev)[:, 0].argmax(-1))
        ms.mask[rows, self.Lm : self.Lm + k - 1] = False
        return np.stack(drafts, 1).astype(np.int64)
