"""`lowbit finetune MODEL --qlora --data SOURCE --steps N -o OUT`: LoRA / QLoRA fine-tuning on CPU."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        model: str = typer.Argument(..., help="a model folder, hub name or 'default'"),
        data: str = typer.Option(..., "--data", help="pydoc, python-docs, a .txt/.jsonl file or folder, or a .jsonl "
                                 "of instructions (messages / instruction+output / prompt+response)"),
        out: str = typer.Option(..., "--out", "-o", help="run folder: adapter/ (peft format), checkpoint/, metrics.json"),
        steps: int = typer.Option(100, "--steps", help="optimizer steps"),
        qlora: bool = typer.Option(False, "--qlora", help="4-bit NF4 base with double quantization (else fp32 base)"),
        quant_type: str = typer.Option("nf4", "--quant-type", help="nf4 or fp4 (with --qlora)"),
        double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="8-bit absmax (with --qlora)"),
        rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank"),
        alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scaling alpha / rank)"),
        dropout: float = typer.Option(0.05, "--dropout", help="LoRA dropout"),
        targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--targets",
                                    help="comma-separated module names (or suffixes)"),
        target_regex: str = typer.Option(None, "--target-regex", help="one regex over full module names (instead of --targets)"),
        init: str = typer.Option("zero", "--init", help="zero (peft's) or loftq (from the quantization residual)"),
        batch_size: int = typer.Option(4, "--batch-size"),
        seq_len: int = typer.Option(256, "--seq-len"),
        lr: float = typer.Option(2e-4, "--lr"),
        warmup: int = typer.Option(10, "--warmup"),
        seed: int = typer.Option(0, "--seed"),
        save_every: int = typer.Option(25, "--save-every", help="checkpoint every N steps"),
        eval_windows: int = typer.Option(16, "--eval-windows", help="held-out windows to evaluate"),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="recompute activations"),
        merge: bool = typer.Option(False, "--merge", help="also write OUT/merged: the original model + adapters"),
        threads: int = typer.Option(None, "--threads", help="torch threads (1 is fastest on a busy shared machine)"),
    ):
        """Fine-tune MODEL with LoRA adapters (QLoRA with --qlora); rerun the same command to resume."""
        from lowbit.errors import LowbitError
        from lowbit.qlora.adapt import LoraConfig
        from lowbit.qlora.finetune import finetune as run
        from lowbit.qlora.trainer import TrainConfig
        from lowbit.runtime import configure

        configure(threads=threads)

        if seq_len < 8:
            raise LowbitError(f"--seq-len must be at least 8; got {seq_len}")
        chosen = target_regex if target_regex else tuple(t.strip() for t in targets.split(",") if t.strip())
        lora = LoraConfig(r=rank, alpha=alpha, dropout=dropout, targets=chosen,
                          quant_type=quant_type if qlora else None, double_quant=double_quant, init=init,
                          gradient_checkpointing=gradient_checkpointing, seed=seed)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(warmup, steps), seed=seed,
                          save_every=save_every)
        m = run(model, data, out, lora, cfg, seq_len=seq_len, eval_windows=eval_windows, merge=merge)
        typer.echo(f"loss {m['final_loss']:.4f}, held-out perplexity {m['eval_ppl']:.3f}, "
                   f"{m['tokens_per_s']:.0f} tokens/s; adapter in {out}/adapter")
