"""Tokens/s of the tiny export through Triton (gRPC streams, concurrent clients) vs the runtime in-process.

    python bench/serve_tiny.py --onnx out/tiny [--clients 8] [--tokens 32]

Same prompts, greedy, both sides; the ratio is what the server (queueing, batching, per-token
responses over loopback gRPC) costs or gains against one in-process `Generator.generate` batch.
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    import tritonclient.grpc as grpcclient

    from qwen3next_trt.deploy.repository import write_repository
    from qwen3next_trt.deploy.server import TritonServer
    from qwen3next_trt.runtime import Generator

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=int(rng.integers(4, 24))).tolist() for _ in range(args.clients)]

    gen = Generator(args.onnx)
    gen.generate(prompts[:1], max_new_tokens=2)  # warm-up
    t0 = time.monotonic()
    direct = gen.generate(prompts, max_new_tokens=args.tokens)
    t_direct = time.monotonic() - t0

    with tempfile.TemporaryDirectory() as tmp, TritonServer([write_repository(args.onnx, f"{tmp}/repo")]) as server:
        def one(i, out):
            client, q = grpcclient.InferenceServerClient(server.grpc_url), queue.Queue()
            client.start_stream(callback=lambda result, error: q.put((result, error)))
            ids = grpcclient.InferInput("input_ids", [len(prompts[i])], "INT64")
            ids.set_data_from_numpy(np.array(prompts[i], np.int64))
            n = grpcclient.InferInput("max_tokens", [1], "INT32")
            n.set_data_from_numpy(np.array([args.tokens], np.int32))
            client.async_stream_infer("qwen3next", [ids, n], enable_empty_final_response=True)
            tokens, first = [], None
            while True:
                result, error = q.get(timeout=300)
                if error is not None:
                    raise RuntimeError(error)
                if result.as_numpy("tokens") is not None:
                    first = first or time.monotonic()
                    tokens += result.as_numpy("tokens").tolist()
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            client.stop_stream()
            client.close()
            out[i] = (tokens, first)

        warm: dict = {}
        one(0, warm)
        served: dict = {}
        threads = [threading.Thread(target=one, args=(i, served)) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_served = time.monotonic() - t0
        first_token = sorted(served[i][1] - t0 for i in served)

    same = all(served[i][0] == direct[i] for i in range(args.clients))
    total = args.clients * args.tokens
    print(f"{args.clients} prompts x {args.tokens} tokens (greedy, tiny, ONNX Runtime CPU)")
    print(f"  in-process Generator.generate : {t_direct:6.2f} s  {total / t_direct:7.1f} tok/s")
    print(f"  Triton, {args.clients} gRPC streams     : {t_served:6.2f} s  {total / t_served:7.1f} tok/s"
          f"  (ratio {t_direct / t_served:.2f}; first token median {first_token[len(first_token) // 2]:.2f} s)")
    print(f"  same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
