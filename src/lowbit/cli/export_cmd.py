"""`lowbit export CHECKPOINT --format F -o OUT`: a lowbit checkpoint in another tool's format."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        checkpoint: Path = typer.Argument(..., help="a lowbit checkpoint folder"),
        fmt: str = typer.Option(..., "--format", "-f", help="gptq | awq | compressed-tensors | bnb-nf4 | gguf | lowbit"),
        out: Path = typer.Option(..., "-o", "--out", help="output folder (or .gguf file)"),
        option: list[str] = typer.Option([], "--option", help="format option KEY=VALUE (repeatable)"),
        overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    ):
        """Write CHECKPOINT's quantized layers, unchanged, in format F."""
        from lowbit.cli.models_cmd import parse_option_args
        from lowbit.errors import LowbitError
        from lowbit.export import format_module, read

        from lowbit.io.atomic import check_output_dir

        module = format_module(fmt)  # an unknown format fails before the checkpoint is read
        if not checkpoint.exists():
            raise LowbitError(f"{checkpoint} does not exist")
        if fmt != "gguf":  # a folder; never the checkpoint being read or a folder holding it
            check_output_dir(out, overwrite, protect=(checkpoint,))
        qm = read(checkpoint)
        module.write(qm, out, overwrite=overwrite, **parse_option_args(option))
        typer.echo(f"saved {out} ({fmt})")
