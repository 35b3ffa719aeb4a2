"""`lowbit inspect CHECKPOINT`: per-layer spec, bits and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        checkpoint: Path = typer.Argument(..., help="a checkpoint lowbit reads (lowbit folder, .gguf file)"),
        as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    ):
        """Show each quantized layer's spec, shape, bits per weight and size."""
        from lowbit.errors import LowbitError
        from lowbit.eval.size import disk_bytes
        from lowbit.export import read

        if not checkpoint.exists():
            raise LowbitError(f"{checkpoint} does not exist")
        qm = read(checkpoint)  # by format: lowbit's own (what `lowbit eval` loads through), gguf, ...
        if as_json:
            typer.echo(json.dumps({**qm.meta, "layers": {
                n: {"spec": qw.spec.to_dict(), "shape": list(qw.shape), "bits_per_weight": round(qw.bits_per_weight(), 4),
                    **({} if qw.error is None else {"rel_error": qw.error})} for n, qw in qm.layers.items()}}, indent=2))
            return
        meta = qm.meta
        typer.echo(f"{checkpoint}: method={meta.get('method')} source={meta.get('source')} "
                   f"lowbit={meta.get('lowbit_version')} size={disk_bytes(checkpoint) / 2**20:.1f} MiB")
        width = max((len(n) for n in qm.layers), default=5)
        has_err = any(qw.error is not None for qw in qm.layers.values())
        typer.echo(f"{'layer'.ljust(width)}  {'spec':<16} {'shape':<12} {'bits/w':>7} {'KiB':>8}"
                   + ("  rel.err  floor" if has_err else ""))
        total_bits = total_n = 0
        for name, qw in qm.layers.items():
            n = qw.codes.numel()
            bpw = qw.bits_per_weight()
            total_bits += bpw * n
            total_n += n
            line = (f"{name.ljust(width)}  {qw.spec.describe():<16} {'x'.join(map(str, qw.shape)):<12} "
                    f"{bpw:>7.3f} {bpw * n / 8 / 1024:>8.1f}")
            if qw.error is not None:
                line += f"  {qw.error:.4f}  {4.0 ** -qw.spec.bits:.4f}"
            typer.echo(line)
        if total_n:
            typer.echo(f"{len(qm.layers)} layers, {total_bits / total_n:.3f} bits per weight on average (on disk)")
