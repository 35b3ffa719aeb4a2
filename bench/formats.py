"""Export the bundled model to every HF format and load each export with its consumer.

    .venv/bin/python bench/formats.py            # needs bench/.venv-gptq (make bench-venv-gptq) for gptq/awq

SmolLM2-135M quantized once with lowbit GPTQ W4 g64 sym (64 x 512 calibration samples), written as gptq,
awq and compressed-tensors; bnb-nf4 holds only NF4, so it gets lowbit RTN NF4 g64 (with and without
double quantization). Each export is loaded by its consumer (transformers + GPTQModel in its own venv
for gptq/awq, transformers + compressed-tensors, transformers + bitsandbytes) and its logits on fixed
prompts are compared with lowbit's own forward of the same records. Prints sizes on disk, max |dlogit|
and top-1 agreement; writes bench/results/formats.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "Quantization makes models smaller because", "import numpy as np\nx = np."]
GPTQ_PY = ROOT / ".venv-gptq" / "bin" / "python"


def consumer_logits(path: Path, tok_path: Path) -> list[torch.Tensor]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kind = type(model.model.layers[0].self_attn.q_proj)
    print(f"  {path.name}: loaded with {kind.__module__}.{kind.__name__}", flush=True)
    with torch.no_grad():
        return [model(tok(p, return_tensors="pt").input_ids).logits[0].float() for p in PROMPTS]


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> dict:
    worst = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, theirs))
    return {"max_abs_dlogit": worst, "top1_agreement": agree / sum(a.shape[0] for a in ours)}


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT.parent / "out" / "formats"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--consumer", help=argparse.SUPPRESS)  # internal: run in the GPTQModel venv
    args = ap.parse_args()
    out = Path(args.out)
    if args.consumer:
        torch.save(consumer_logits(Path(args.consumer), out / "lowbit-gptq"), out / f"{Path(args.consumer).name}.pt")
        return

    import transformers

    import lowbit
    from lowbit.export import bnb, read, write

    from lowbit.models.loader import default_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    ids = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    if not (out / "lowbit-gptq").exists():
        lowbit.quantize("default", method="gptq", bits=4, group_size=64, samples=args.samples,
                        out=out / "lowbit-gptq", overwrite=True)
    if not (out / "lowbit-nf4").exists():
        lowbit.quantize("default", method="rtn", dtype="nf4", group_size=64, out=out / "lowbit-nf4", overwrite=True)

    def ours(qm, dense=False):
        """lowbit's forward (QuantLinear kernels: int4 in bf16), or dense fp32 Linears of the dequantized records."""
        model = qm.to_module()
        if dense:
            from lowbit.nn.replace import replace_linear

            for name, qw in qm.layers.items():
                lin = torch.nn.Linear(qw.shape[1], qw.shape[0], bias=qm.bias(name) is not None)
                lin.weight.data = qw.dequantize()
                if lin.bias is not None:
                    lin.bias.data = qm.bias(name).float()
                replace_linear(model, name, lin)
        with torch.no_grad():
            return [model(i).logits[0].float() for i in ids]

    results = {"model": "SmolLM2-135M", "prompts": PROMPTS, "rows": []}
    gptq_qm, nf4_qm = read(out / "lowbit-gptq"), read(out / "lowbit-nf4")
    dq_qm = bnb.double_quantize(nf4_qm)
    runs = [("gptq", "lowbit-gptq", gptq_qm, {}), ("awq", "lowbit-gptq", gptq_qm, {}),
            ("compressed-tensors", "lowbit-gptq", gptq_qm, {}), ("bnb-nf4", "lowbit-nf4", nf4_qm, {}),
            ("bnb-nf4", "lowbit-nf4 double-quantized", dq_qm, {"double_quant": True})]
    sources = {"lowbit-gptq": gptq_qm, "lowbit-nf4": nf4_qm, "lowbit-nf4 double-quantized": dq_qm}
    reference = {k: ours(v) for k, v in sources.items()}
    dense = {k: ours(v, dense=True) for k, v in sources.items()}
    for fmt, source, qm, opts in runs:
        name = fmt + ("-dq" if opts else "")
        folder = write(qm, out / name, fmt, overwrite=True, **opts)
        ref = reference[source]
        t0 = time.time()
        if fmt in ("gptq", "awq"):
            if not GPTQ_PY.exists():
                print(f"  {name}: skipped, no {GPTQ_PY} (make bench-venv-gptq)")
                continue
            subprocess.run([str(GPTQ_PY), __file__, "--out", str(out), "--consumer", str(folder)], check=True,
                           stdout=sys.stdout, stderr=subprocess.DEVNULL)
            theirs = torch.load(out / f"{name}.pt")
            consumer = "transformers 5.23 + GPTQModel 7.6 (bench/.venv-gptq)"
        else:
            theirs = consumer_logits(folder, out / source.split()[0])
            consumer = ("transformers 5.23 + compressed-tensors 0.20.1" if fmt == "compressed-tensors"
                        else "transformers 5.23 + bitsandbytes 0.50.2")
        vs_dense = compare(dense[source], theirs)
        row = {"format": name, "records": source,
               "consumer": consumer, "size_mib": round(size_mib(folder), 1), **compare(ref, theirs),
               "vs_fp32_dequantized": vs_dense, "load_and_run_s": round(time.time() - t0, 1)}
        results["rows"].append(row)
        print(f"{name:20s} {row['size_mib']:7.1f} MiB  max|dlogit| {row['max_abs_dlogit']:.2e}  "
              f"top-1 {row['top1_agreement']:.3f} | vs fp32 dequantized: {vs_dense['max_abs_dlogit']:.2e} "
              f"{vs_dense['top1_agreement']:.3f}  ({row['consumer']})", flush=True)
    for source in ("lowbit-gptq", "lowbit-nf4"):
        print(f"{source:20s} {size_mib(out / source):7.1f} MiB  (lowbit's own format)")
        results[f"{source}_size_mib"] = round(size_mib(out / source), 1)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "formats.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
