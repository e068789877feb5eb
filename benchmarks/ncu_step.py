"""One eager fast-decode step of a synthetic model, for Nsight Compute (issue 6 profiling).

    ncu --clock-control none --cache-control none -k regex:fd_output --launch-skip 1 --launch-count 1 \
        python3 benchmarks/ncu_step.py [smollm2|qwen0.5b|qwen7b] [tune, e.g. down_xr=1+gate_up_xr=1]

The decoder's warm-up launches every kernel once with state.done = 1 (they return at once): skip
those (n_layer launches of each per-layer kernel, one of fd_output). Then 2 eager steps at position 512.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import MODELS  # noqa: E402

import rocmforge_lab as rf  # noqa: E402
from rocmforge_lab import synth  # noqa: E402
from rocmforge_lab.backend.fast_decode import FastDecoder  # noqa: E402

key = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
spec = next(m for m in MODELS if m[0] == key)
_, label, arch, shape, qtype = spec[:5]
path = synth.make_gguf(Path("/tmp") / f"{shape}-{qtype}.gguf", arch=arch, shape=shape, qtype=qtype, seed=0,
                       random_bytes=True)
m = rf.load(str(path), device="gpu", progress=False)
s = m.session(n_ctx=656)
prompt = np.random.default_rng(0).integers(100, 20000, size=512).tolist()
tok = int(np.argmax(s.forward(prompt, last_only=True)[-1]))
tune = {k: int(v) for k, v in (kv.split("=") for kv in sys.argv[2].split("+"))} if len(sys.argv) > 2 else {}
fd = FastDecoder(m, s, graph=False, tune=tune)
print(fd.decode(tok, 2))
