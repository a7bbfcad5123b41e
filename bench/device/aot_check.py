"""Do engines built ahead of time for SM80/SM89/SM120 (as on a CPU machine) deserialize and run on this GPU?"""
import sys

import numpy as np

from qwen3next_trt.export.manifest import Manifest
from qwen3next_trt.sessions import OrtSession, engine_path, open_engine
from qwen3next_trt.validate.inputs import feeds_for

onnx_dir, eng_dir = sys.argv[1], sys.argv[2]
manifest = Manifest.load(onnx_dir)
for rec in manifest.graphs:
    if not engine_path(eng_dir, rec).exists():
        continue
    try:
        session = open_engine(eng_dir, rec, manifest)
        label, feed = feeds_for(rec, manifest.vocab_size, seed=1)[0]
        got = session.run(None, feed)
        try:
            ref = OrtSession(manifest.dir / rec.file).run(None, feed)
            err = max(float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, ref))
            print(f"{rec.name}: AOT engine ran; max abs vs onnxruntime {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001 - an ONNX Runtime without the contrib ops: say so, go on
            print(f"{rec.name}: AOT engine ran; onnxruntime could not run it: {str(e)[:120]}", flush=True)
    except Exception as e:  # noqa: BLE001 - one line per engine, whatever failed
        print(f"{rec.name}: FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
