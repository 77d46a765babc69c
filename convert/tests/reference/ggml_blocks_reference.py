"""Dequantized values of pseudo-random ggml blocks, computed by gguf-py.

The converter's dequantizers are checked against these values (an
implementation independent of ours: gguf-py's numpy code).

Regenerate (from the repository root):
    pip install gguf==0.19.0
    python3 convert/tests/reference/ggml_blocks_reference.py > convert/tests/reference/ggml_blocks.json
"""

import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# type -> byte offsets of f16 fields that must hold finite values
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}
BLOCK_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24, T.Q8_0: 34, T.Q4_K: 144, T.Q6_K: 210}


def main():
    rng = np.random.default_rng(1234)
    out = {}
    for ty, size in BLOCK_BYTES.items():
        blocks = 2
        raw = rng.integers(0, 256, size=blocks * size, dtype=np.uint8)
        for b in range(blocks):
            for off in F16_FIELDS[ty]:
                v = np.float16(rng.uniform(-0.05, 0.05))
                raw[b * size + off : b * size + off + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
        values = dequantize(raw, ty).astype(np.float32).reshape(-1)
        out[ty.name] = {"bytes": raw.tobytes().hex(), "values": [float(v) for v in values]}
    json.dump(out, sys.stdout, indent=0)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
