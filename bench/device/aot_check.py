"""Do engines built ahead of time for SM80/SM89/SM120 (as on a CPU machine) deserialize and run on this GPU?"""
import sys
import numpy as np
import onnxruntime as ort
import json
onnx_dir, eng_dir = sys.argv[1], sys.argv[2]
from qwen3next_trt.engines.runtime import EngineSession
from qwen3next_trt.validate.inputs import feeds_for
manifest = json.load(open(f"{onnx_dir}/manifest.json"))
for rec in manifest["graphs"]:
    path = f"{eng_dir}/{rec['name']}.engine"
    try:
        import os
        if not os.path.exists(path):
            continue
        s = EngineSession(path)
        label, feed = feeds_for(rec, manifest["config"], seed=1)[0]
        got = s.run(None, feed)
        try:
            ref = ort.InferenceSession(f"{onnx_dir}/{rec['file']}", providers=["CPUExecutionProvider"]).run(None, feed)
            err = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, ref))
            print(f"{rec['name']}: AOT engine ran; max abs vs onnxruntime {err:.2e}", flush=True)
        except Exception as e:
            print(f"{rec['name']}: AOT engine ran; onnxruntime could not run it: {str(e)[:120]}", flush=True)
    except Exception as e:
        print(f"{rec['name']}: FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
