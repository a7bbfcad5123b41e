"""Device-resident decode (runtime/device.py) against the host path on the same CUDA sessions, per export
dtype: tokens, and the logits of every step along the shared path (max abs difference; where the paths
part, the host logits' top-2 margin there). The host path is run twice: its own run-to-run spread.

    python3 bench/device/ort_paths.py EXPORT_DIR... (bench/device/ort_device.sh paths)
"""

from __future__ import annotations

import json
import sys

import numpy as np


def run(gen, prompts, n):
    tokens, logits = [[] for _ in prompts], [[] for _ in prompts]
    for ev in gen.stream(prompts, n, keep_logits=True):
        tokens[ev.request].append(ev.token)
        logits[ev.request].append(ev.logits)
    return tokens, [np.stack(x) for x in logits]


def compare(a, b):
    """(identical tokens, first differing step per row, max abs logits diff before it, host top-2 margin there)"""
    (ta, la), (tb, lb) = a, b
    rows = []
    for r in range(len(ta)):
        diff = [i for i, (x, y) in enumerate(zip(ta[r], tb[r])) if x != y]
        first = diff[0] if diff else len(ta[r])
        upto = first + 1 if diff else first  # the step that chose differently is compared too
        err = float(np.abs(la[r][:upto] - lb[r][:upto]).max())
        margin = None
        if diff:
            top2 = np.sort(la[r][first])[-2:]
            margin = float(top2[1] - top2[0])
        rows.append({"first_difference": first if diff else None, "logits_max_abs": err, "host_top2_margin_there": margin})
    return {"tokens_equal": ta == tb, "rows": rows}


def main():
    import torch  # noqa: F401

    from qwen3next_trt.runtime import Generator

    out = {}
    for d in sys.argv[1:]:
        gen = Generator(d, device="cuda")
        rng = np.random.default_rng(5)
        prompts = [rng.integers(0, gen.vocab_size, n).tolist() for n in (8, 8, 13)]
        n = 32
        gen.device_resident = False
        host = run(gen, prompts, n)
        host2 = run(gen, prompts, n)
        gen.device_resident = True
        res = {"host_vs_host": compare(host, host2)}
        for graphs in (False, True):
            gen.cuda_graphs = graphs
            res[f"device_cuda_graphs_{'on' if graphs else 'off'}_vs_host"] = compare(host, run(gen, prompts, n))
            res[f"captured_{'on' if graphs else 'off'}"] = gen.last_stats.cuda_graphs
        out[d] = res
        print(d, json.dumps(res), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
