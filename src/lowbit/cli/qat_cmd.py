"""`lowbit train-qat`: quantization-aware training of a causal LM from a PTQ start (hybrid)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-qat")
    def train_qat(
        model: str = typer.Argument(..., help="model folder, .gguf, hub name or 'default'"),
        out: Path = typer.Option(..., "-o", "--out", help="output folder (a lowbit checkpoint)"),
        scheme: str = typer.Option("w3g64", help="weight preset: w3g64 | w2g64 | w4g64 | w4g128 | w8 | ..."),
        init: str = typer.Option("gptq", help="PTQ start: rtn | gptq | awq | minmax"),
        data: str = typer.Option("pydoc", help="training text as --calib takes: pydoc, python-docs, a file or "
                                               "folder (its held-out part is never trained on)"),
        method: str = typer.Option("block-ap", help="block-ap (EfficientQAT Block-AP: each decoder block trained to "
                                                    "reproduce the original block's outputs) | e2e (whole model, "
                                                    "distillation)"),
        steps: int = typer.Option(40, help="optimizer steps (per decoder block with --method block-ap)"),
        lr: Optional[float] = typer.Option(None, help="peak learning rate of the weights (cosine decay); default "
                                                      "1e-3 (block-ap) / 1e-5 (e2e)"),
        qparam_lr: Optional[float] = typer.Option(None, "--qparam-lr", help="learning rate of the scales / zeros; "
                                                                             "default as --lr"),
        batch: int = typer.Option(4, help="windows per step"),
        seq_len: int = typer.Option(256, "--seq-len", help="tokens per window"),
        seed: int = typer.Option(0, help="seed (data order, init): the same seed gives the same result"),
        loss: str = typer.Option("kd", help="kd (distill the full-precision model's logits) | ce"),
        calib_samples: int = typer.Option(32, "--calib-samples", help="PTQ calibration windows (gptq / awq); "
                                                                       "Block-AP's training windows"),
        scales_only: bool = typer.Option(False, "--scales-only", help="train the quantization scales and zeros "
                                                                       "only (frozen weights)"),
        checkpoint_every: int = typer.Option(25, "--checkpoint-every", help="steps between checkpoints"),
        overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    ):
        """Fine-tune MODEL with fake-quantized weights from an RTN / GPTQ / AWQ start, distilling the
        original; save the real quantized model. Rerunning an interrupted command resumes."""
        from lowbit.qat.lm import LMQATOptions, train_qat_lm
        from lowbit.runtime import configure

        opts = LMQATOptions(method=method, scheme=scheme, init=init, data=data, steps=steps, lr=lr, qparam_lr=qparam_lr, batch=batch,
                            seq_len=seq_len, seed=seed, loss=loss, calib_samples=calib_samples,
                            train_weights=not scales_only, checkpoint_every=checkpoint_every)
        configure()
        _, _, result = train_qat_lm(model, out, opts, overwrite=overwrite)
        first, last = result.losses[0], result.losses[-1]
        typer.echo(f"loss {first:.4g} -> {last:.4g} over {len(result.losses)} steps; saved {out}")
