"""`lowbit generate CHECKPOINT --prompt "..."`: look at what a (quantized) model says."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: str = typer.Argument(..., help="a lowbit checkpoint, model folder, .gguf file or 'default'"),
        prompt: str = typer.Option(..., "--prompt", "-p", help="the user message (or raw text with --raw)"),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="tokens to generate"),
        raw: bool = typer.Option(False, "--raw", help="no chat template: continue the prompt as plain text"),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        seed: int = typer.Option(0, help="sampling seed"),
    ):
        """Generate from MODEL, streaming tokens; prints tokens/s at the end (stderr)."""
        from lowbit.errors import LowbitError
        from lowbit.runtime.generate import generate_text

        if max_new_tokens < 1:
            raise LowbitError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
        if temperature < 0:
            raise LowbitError(f"--temperature must be >= 0; got {temperature}")
        stats = generate_text(model, prompt, max_new_tokens=max_new_tokens, chat=not raw,
                              temperature=temperature, seed=seed, stream=lambda t: typer.echo(t, nl=False))
        typer.echo("")
        typer.echo(f"{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_s']:.1f} tokens/s",
                   err=True)
