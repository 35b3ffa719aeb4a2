"""Where does dequantize + bf16 GEMM overtake lowbit's GEMV kernels? (sets nn.quant_linear.GEMV_MAX_ROWS)

Run: .venv/bin/python bench/kernel_crossover.py   -> bench/results/kernel_crossover.json
"""

import json
import time
from pathlib import Path

import torch

from lowbit import QuantSpec
from lowbit.core import quantize
from lowbit.nn import QuantLinear, quant_linear

SHAPES = [(1536, 576), (576, 1536), (192, 576), (49152, 576)]
ROWS = [1, 2, 4, 8, 12, 16, 32, 64, 256]
SPECS = {"int4": QuantSpec(4, "int", True, "group", 64), "int3": QuantSpec(3, "int", True, "group", 64),
         "int8": QuantSpec(8, "int", True, "channel")}


def timeit(f, reps=20):
    for _ in range(3):
        f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 4] * 1e6  # lower quartile: robust to other load on the machine


def main():
    import sys
    if len(sys.argv) > 1:  # threads; 1 avoids OpenMP barrier stalls when other jobs share the cores
        torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    out = []
    with torch.inference_mode():
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.02
            wb = w.bfloat16()
            for kind, spec in SPECS.items():
                m = QuantLinear.from_quantized(quantize(w, spec))
                for rows in ROWS:
                    if n > 10000 and rows not in (1, 16, 64, 256):
                        continue
                    x = torch.randn(rows, k)
                    xb = x.bfloat16()
                    quant_linear.GEMV_MAX_ROWS = 10**9
                    kern = timeit(lambda: m(xb))
                    quant_linear.GEMV_MAX_ROWS = 0
                    deq = timeit(lambda: m(xb))
                    row = {"shape": [n, k], "kind": kind, "rows": rows, "kernel_us": kern, "dequant_bf16_us": deq,
                           "fp32_dense_us": timeit(lambda: x @ w.T), "bf16_dense_us": timeit(lambda: xb @ wb.T)}
                    print(json.dumps(row))
                    out.append(row)
    path = Path(__file__).parent / "results" / "kernel_crossover.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
