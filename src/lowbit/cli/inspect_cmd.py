"""`lowbit inspect CHECKPOINT`: per-layer spec, bits and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        checkpoint: Path = typer.Argument(..., help="a lowbit checkpoint folder"),
        as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    ):
        """Show each quantized layer's spec, shape, bits per weight and size."""
        from lowbit.errors import LowbitError
        from lowbit.eval.size import disk_bytes
        from lowbit.io.checkpoint import read_manifest

        if not checkpoint.exists():
            raise LowbitError(f"{checkpoint} does not exist")
        manifest = read_manifest(checkpoint)
        if as_json:
            typer.echo(json.dumps(manifest, indent=2))
            return
        from lowbit.spec import QuantSpec

        typer.echo(f"{checkpoint}: method={manifest['method']} source={manifest['source']} "
                   f"lowbit={manifest['lowbit_version']} size={disk_bytes(checkpoint) / 2**20:.1f} MiB")
        width = max((len(n) for n in manifest["layers"]), default=5)
        typer.echo(f"{'layer'.ljust(width)}  {'spec':<16} {'shape':<12} {'bits/w':>7} {'KiB':>8}"
                   + ("  rel.err  floor" if any("rel_error" in v for v in manifest["layers"].values()) else ""))
        total_bits = total_n = 0
        for name, info in manifest["layers"].items():
            spec = QuantSpec.from_dict(info["spec"])
            n = info["shape"][0] * info["shape"][1]
            bpw = info["bits_per_weight"]
            total_bits += bpw * n
            total_n += n
            line = (f"{name.ljust(width)}  {spec.describe():<16} {'x'.join(map(str, info['shape'])):<12} "
                    f"{bpw:>7.3f} {bpw * n / 8 / 1024:>8.1f}")
            if "rel_error" in info:
                line += f"  {info['rel_error']:.4f}  {info.get('error_floor', float('nan')):.4f}"
            typer.echo(line)
        if total_n:
            typer.echo(f"{len(manifest['layers'])} layers, {total_bits / total_n:.3f} bits per weight on average")
