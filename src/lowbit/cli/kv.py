"""`lowbit kv-eval`: quality and size of a quantized KV cache against the full-precision cache."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("kv-eval")
    def kv_eval_cmd(
        model: str = typer.Argument(..., help="model folder, .gguf file, hub name, or 'default'"),
        method: str = typer.Option("turboquant", help="turboquant | turboquant-prod | polarquant | qjl | kivi"),
        bits: float = typer.Option(3.5, help="code bits per coordinate, fractional allowed (e.g. 2.5)"),
        window: int = typer.Option(0, min=0, help="newest tokens kept in full precision"),
        keep_first: int = typer.Option(0, min=0, help="first decoder layers left unquantized"),
        keep_last: int = typer.Option(0, min=0, help="last decoder layers left unquantized"),
        sink: Optional[int] = typer.Option(None, min=0, help="first tokens kept in full precision (default 1, KIVI 0)"),
        group_size: int = typer.Option(32, min=1, help="KIVI group size"),
        center: Optional[bool] = typer.Option(None, "--center/--no-center", help="quantize around the per-head mean"),
        plain: bool = typer.Option(False, "--plain", help="the paper's quantizer as is: no key frame, no sink"),
        key_basis_windows: int = typer.Option(0, min=0, help="calibrate a key basis on this many windows of the "
                                              "text's calibration part (0: off)"),
        seed: int = typer.Option(0, help="seed of the random rotations"),
        text: str = typer.Option("pydoc", help="evaluation text source (its held-out part is used)"),
        seq_len: int = typer.Option(512, min=2, help="tokens per evaluation window"),
        windows: int = typer.Option(4, min=1, help="number of evaluation windows"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ):
        """Perplexity, KL and top-1 agreement of MODEL with a quantized KV cache vs the full-precision cache."""
        import torch

        from lowbit.calibration import eval_windows, load_text
        from lowbit.calibration.text import check_text_source
        from lowbit.errors import LowbitError
        from lowbit.kvcache.evaluate import cache_factory, kv_eval
        from lowbit.models import load_model
        from lowbit.models.loader import resolve_source

        resolve_source(model)  # a typo fails before anything loads
        check_text_source(text)
        m, tokenizer = load_model(model)
        m.eval()
        split = load_text(text)
        basis = None
        if key_basis_windows > 0:
            from lowbit.kvcache.key_basis import calibrate_key_bases

            cal = eval_windows(tokenizer, split.calibration, seq_len=seq_len, max_windows=key_basis_windows)
            with torch.inference_mode():
                basis = calibrate_key_bases(m, cal, progress=not as_json)
        try:
            make = cache_factory(m.config, method, bits, window=window, keep_first=keep_first,
                                 keep_last=keep_last, sink=sink, group_size=group_size, center=center, seed=seed,
                                 plain=plain, key_basis=basis)
        except ValueError as e:
            raise LowbitError(str(e)) from None
        ids = eval_windows(tokenizer, split.evaluation, seq_len=seq_len, max_windows=windows)
        with torch.inference_mode():
            r = kv_eval(m, ids, {method: make}, progress=not as_json)[method]
        r = {"method": method, "bits": bits, **r}
        if as_json:
            typer.echo(json.dumps(r, indent=2))
            return
        typer.echo(f"KV cache {method} @ {bits:g} bits on {r['tokens']} held-out tokens")
        typer.echo(f"  perplexity        {r['perplexity']:.4f}  (full precision {r['perplexity_fp']:.4f}, "
                   f"{r['perplexity_change_pct']:+.2f}%)")
        typer.echo(f"  KL(full || quant) {r['kl']:.5f}")
        typer.echo(f"  top-1 agreement   {100 * r['top1_agreement']:.2f}%")
        typer.echo(f"  KV bits / coord   {r['kv_bits_per_coordinate']:.3f}  (memory ratio vs fp16 "
                   f"{r['kv_memory_ratio']:.2f}x)")
