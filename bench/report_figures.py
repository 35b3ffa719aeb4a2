"""Regenerate the README's report figures: `make figures` (or `.venv/bin/python bench/report_figures.py`).

Quantizes the bundled SmolLM2-135M-Instruct (once; existing checkpoints are reused) with GPTQ and
RTN at W4 g64 sym and W3 g64 asym (`--record-stats`: time and peak RSS in the metadata), writes
the GPTQ W4 checkpoint again in the AutoGPTQ layout and an RTN Q4_0 GGUF file (other tools' formats
in the same tables), then runs `lowbit report` over all of them and copies the plots to
docs/figures/ and the report's JSON to bench/results/report_figures.json.

    --out DIR        where checkpoints and the report go (default out/report-figures)
    --windows N      held-out evaluation windows of 512 tokens (default 8)
    --questions N    questions of the multiple-choice task (default 50)
    --fresh          quantize again even where a checkpoint exists
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWBIT = str(Path(sys.executable).parent / "lowbit")
FIGURES = ROOT / "docs" / "figures"
RESULT = ROOT / "bench" / "results" / "report_figures.json"

# name -> lowbit quantize arguments
CHECKPOINTS = {
    "gptq-w4g64": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym"],
    "gptq-w3g64a": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--asym"],
    "rtn-w4g64": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--sym"],
    "rtn-w3g64a": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--asym"],
    "rtn-q4_0.gguf": ["--method", "rtn", "--format", "gguf", "--format-option", "type=Q4_0"],
}


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "report-figures")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    ckpt_dir = args.out / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, qargs in CHECKPOINTS.items():
        path = ckpt_dir / name
        if args.fresh or not path.exists():
            run(LOWBIT, "quantize", "default", *qargs, "--record-stats", "-o", str(path), "--overwrite")
        paths.append(path)
    gptq_layout = ckpt_dir / "gptq-w4g64-autogptq"
    if args.fresh or not gptq_layout.exists():
        run(LOWBIT, "export", str(ckpt_dir / "gptq-w4g64"), "--format", "gptq", "-o", str(gptq_layout), "--overwrite")
    paths.insert(1, gptq_layout)
    report = args.out / "report"
    run(LOWBIT, "report", "default", *map(str, paths), "-o", str(report), "--overwrite",
        "--windows", str(args.windows), "--task-questions", str(args.questions))
    FIGURES.mkdir(parents=True, exist_ok=True)
    for png in sorted(report.glob("*.png")):
        shutil.copyfile(png, FIGURES / png.name)
    data = json.loads((report / "report.json").read_text())
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(data, indent=2) + "\n")
    print((report / "report.md").read_text())
    print(f"figures in {FIGURES}, report in {report}, JSON in {RESULT}")


if __name__ == "__main__":
    main()
