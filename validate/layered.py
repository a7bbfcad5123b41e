"""Run a whole exported model through its per-layer graphs: embed -> layers -> final, states fed back.

This is the end-to-end check of the export (prefill graphs, then decode graphs with the states the
previous step returned); the generation runtime is built on the same manifest contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class LayeredModel:
    """Sessions for every graph an end-to-end pass needs, from one export directory."""

    def __init__(self, onnx_dir: Path, manifest: dict, session_factory):
        self.dir, self.manifest = Path(onnx_dir), manifest
        by_name = {g["name"]: g for g in manifest["graphs"]}
        n = manifest["config"]["num_hidden_layers"]
        needed = ["embed", "final"] + [f"layer_{i:02d}.{m}" for i in range(n) for m in ("prefill", "decode")]
        missing = [g for g in needed if g not in by_name]
        if missing:
            raise LookupError(f"not a full export: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} missing")
        self.records = {name: by_name[name] for name in needed}
        self.sessions = {name: session_factory(self.dir / rec["file"]) for name, rec in self.records.items()}
        self.n_layers = n

    def zero_states(self, batch: int) -> list[dict]:
        states = []
        for i in range(self.n_layers):
            rec = self.records[f"layer_{i:02d}.prefill"]
            st = {}
            for p in rec["inputs"]:
                if p["role"] == "state-in":
                    shape = [batch if d == "batch" else 0 if d == "past" else d for d in p["shape"]]
                    st[p["name"]] = np.zeros(shape, NUMPY_DTYPES.get(p["dtype"], np.float32))
            states.append(st)
        return states

    def step(self, input_ids: np.ndarray, past: int, states: list[dict], mode: str):
        """Logits [B, T, V] for input_ids [B, T] at positions past..past+T-1; returns new states."""
        B, T = input_ids.shape
        (hidden,) = self.sessions["embed"].run(None, {"input_ids": input_ids})
        positions = np.broadcast_to(np.arange(past, past + T, dtype=np.int64), (B, T)).copy()
        new_states = []
        for i in range(self.n_layers):
            name = f"layer_{i:02d}.{mode}"
            rec = self.records[name]
            feed = {"hidden": hidden, **states[i]}
            if any(p["name"] == "position_ids" for p in rec["inputs"]):
                feed["position_ids"] = positions
                feed["attention_mask"] = np.ones((B, past + T), np.bool_)
            outs = dict(zip([o["name"] for o in rec["outputs"]], self.sessions[name].run(None, feed)))
            hidden = outs.pop("hidden_out")
            # state-out ports carry the same state as the state-in port of the same `state` key
            by_state = {o["state"]: outs[o["name"]] for o in rec["outputs"] if o["role"] == "state-out"}
            new_states.append({p["name"]: by_state[p["state"]] for p in rec["inputs"] if p["role"] == "state-in"})
        logits, _ = self.sessions["final"].run(None, {"hidden": hidden})
        return logits, new_states

    def greedy(self, prompt: np.ndarray, max_new_tokens: int):
        """(new tokens [B, N], per-step logits) with prefill graphs once, then decode graphs."""
        states = self.zero_states(prompt.shape[0])
        logits, states = self.step(prompt, 0, states, "prefill")
        past = prompt.shape[1]
        tokens, step_logits = [], [logits[:, -1]]
        for _ in range(max_new_tokens):
            nxt = step_logits[-1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(nxt)
            if len(tokens) == max_new_tokens:
                break
            logits, states = self.step(nxt, past, states, "decode")
            past += 1
            step_logits.append(logits[:, -1])
        return np.concatenate(tokens, 1), step_logits
