"""`lowbit fit`: weight bits per layer and KV-cache bits together, for the best measured quality
that fits a memory budget at a context length."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.plan_cmd import BITS_HELP, GROUPS_HELP, SYM_HELP


def register(app: typer.Typer) -> None:
    @app.command()
    def fit(
        model: str = typer.Argument(..., help="model folder, .gguf file, hub name, or 'default'"),
        memory: str = typer.Option(..., "--memory", help="memory budget: weights + KV cache + decode working set, "
                                                         "e.g. 600MB, 600M (decimal), 1.5GiB (binary)"),
        context: int = typer.Option(..., "--context", help="tokens the KV cache must hold (batch 1)"),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="write the quantized checkpoint here (its "
                                                                     "lowbit.json records the KV choice)"),
        no_apply: bool = typer.Option(False, "--no-apply", help="only print the plan"),
        kv_methods: str = typer.Option("turboquant,kivi", help="KV quantizers to consider, comma-separated "
                                                               "(turboquant, turboquant-prod, polarquant, qjl, kivi)"),
        kv_bits: str = typer.Option("2,2.5,3,3.5,4", help="KV bit widths to consider, comma-separated"),
        no_fp_kv: bool = typer.Option(False, "--no-fp-kv", help="leave the full-precision cache out"),
        weight_kl_scale: float = typer.Option(2.0, help="factor on the weights' predicted KL (Σ sensitivity x "
                                                        "error) before adding the KV cache's measured KL"),
        bits_options: str = typer.Option("2,3,4,5,6,8", help=BITS_HELP),
        group_options: str = typer.Option("32,64,128,0", help=GROUPS_HELP),
        option_symmetry: str = typer.Option("auto", help=SYM_HELP),
        measurement: Optional[Path] = typer.Option(None, help="weights measurement JSON to write / reuse "
                                                              "(default: the cache)"),
        kv_measurement: Optional[Path] = typer.Option(None, help="KV measurement JSON to write / reuse "
                                                                 "(default: the cache)"),
        option: list[str] = typer.Option([], "--option", help="GPTQ option KEY=VALUE (repeatable)"),
        calib: Optional[str] = typer.Option(None, help="calibration text: pydoc (default), a file/folder, "
                                                       "or a dataset name"),
        samples: int = typer.Option(32, min=1, help="calibration samples (measurement and quantization)"),
        seq_len: int = typer.Option(512, min=1, help="calibration sample length in tokens"),
        kv_windows: int = typer.Option(2, min=1, help="calibration windows measuring each KV option"),
        kv_seq_len: int = typer.Option(512, min=2, help="tokens per KV calibration window"),
        text: str = typer.Option("pydoc", help="evaluation text (its held-out part) for the measured perplexity"),
        eval_windows: int = typer.Option(8, min=1, help="evaluation windows"),
        eval_seq_len: int = typer.Option(512, min=2, help="tokens per evaluation window"),
        overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ):
        """Choose weight options per layer and the KV cache together for the least predicted KL
        within --memory at --context tokens; print the plan; quantize with it (unless --no-apply) and
        report the measured perplexity with the quantized KV cache."""
        from lowbit.calibration.text import check_text_source
        from lowbit.cli.models_cmd import parse_option_args
        from lowbit.cli.plan_cmd import symmetry
        from lowbit.errors import LowbitError
        from lowbit.mixed.fit_run import fit as fit_plan, fit_json, format_fit, prepare
        from lowbit.mixed.kv_options import kv_options, parse_floats
        from lowbit.mixed.memory import parse_memory
        from lowbit.mixed.options import parse_list
        from lowbit.models import load_model
        from lowbit.models.loader import resolve_source
        from lowbit.runtime import configure

        budget = parse_memory(memory)
        if context <= 0:
            raise LowbitError(f"--context must be a positive number of tokens; got {context}")
        kv_opts = kv_options(tuple(m.strip() for m in kv_methods.split(",") if m.strip()),
                             parse_floats(kv_bits, "--kv-bits"), include_fp=not no_fp_kv)
        bits = parse_list(bits_options, "--bits-options")
        groups = parse_list(group_options, "--group-options")
        sym = symmetry(option_symmetry)
        method_options = parse_option_args(option)
        if not no_apply:
            check_text_source(text)
            if out is not None and out.exists() and not overwrite:
                raise LowbitError(f"{out} exists; pass --overwrite to replace it or choose another -o")
        resolve_source(model)
        configure()
        fp_model, tokenizer = load_model(model)
        fp_model.eval()
        setup = prepare(fp_model, tokenizer, model, calib=calib, samples=samples, seq_len=seq_len, bits=bits,
                        groups=groups, symmetric=sym, method_options=method_options, measurement=measurement,
                        kv_options=kv_opts, kv_windows=kv_windows, kv_seq_len=kv_seq_len,
                        kv_measurement=kv_measurement, progress=not as_json)
        choice = fit_plan(setup, budget, context, weight_kl_scale)
        result = fit_json(choice, setup, context)
        if not as_json:
            typer.echo(format_fit(choice, setup, context))
        if not no_apply:
            result["measured"] = _apply(model, fp_model, tokenizer, setup, choice, context, out=out,
                                        method_options=method_options, calib=calib, samples=samples,
                                        seq_len=seq_len, overwrite=overwrite, text=text, windows=eval_windows,
                                        eval_seq_len=eval_seq_len, as_json=as_json)
        if as_json:
            typer.echo(json.dumps(result, indent=2))


def _apply(source, fp_model, tokenizer, setup, choice, context, *, out, method_options, calib, samples, seq_len,
           overwrite, text, windows, eval_seq_len, as_json) -> dict:
    """Quantize with the plan (saving to `out` if given), evaluate, print predicted vs measured."""
    import math

    from lowbit import api
    from lowbit.eval.size import memory_bytes
    from lowbit.mixed.apply import plan_recipe
    from lowbit.mixed.fit_run import evaluate_fit
    from lowbit.mixed.kv_options import kv_choice_meta
    from lowbit.mixed.memory import format_bytes, kv_bytes

    best = choice.best
    option = setup.option(best.kv.name)
    recipe = plan_recipe(best.plan, setup.meas, options=method_options)
    meta = {"kv_cache": kv_choice_meta(option, context, choice.budget)}
    q_model, _ = api.quantize_to(source, out, recipe, calib_text=calib, n_samples=samples, seq_len=seq_len,
                                 overwrite=overwrite, progress=not as_json, meta=meta)
    q_model.eval()
    r = evaluate_fit(fp_model, q_model, tokenizer, option, text=text, seq_len=eval_seq_len, windows=windows,
                     progress=not as_json)
    b = setup.breakdown(choice, context)
    weights_measured = memory_bytes(q_model)
    kv_pred = kv_bytes(setup.shape, setup.layouts[option.name], r["kv_bytes_tokens"])
    both, w, kv = r["both"], r["weights"], r["kv"]
    measured = {"perplexity": both["perplexity"], "perplexity_fp": both["perplexity_fp"], "kl": both["kl"],
                "top1_agreement": both["top1_agreement"], "kl_weights_only": w["kl"], "kl_kv_only": kv["kl"],
                "perplexity_weights_only": w["perplexity"], "perplexity_kv_only": kv["perplexity"],
                "predicted_perplexity": both["perplexity_fp"] * math.exp(best.predicted_kl),
                "weight_bytes_measured": weights_measured, "weight_bytes_predicted": b.weights,
                "kv_bytes_measured": r["kv_bytes_measured"], "kv_bytes_predicted": kv_pred,
                "kv_bytes_tokens": r["kv_bytes_tokens"], "out": None if out is None else str(out)}
    if not as_json:
        typer.echo(f"measured on {windows} x {eval_seq_len} held-out {text} tokens, against full precision "
                   f"(weights and cache):")
        typer.echo(f"  perplexity {both['perplexity']:.3f} with the {option.name} KV cache (full precision "
                   f"{both['perplexity_fp']:.3f}; predicted {measured['predicted_perplexity']:.3f}); KL "
                   f"{both['kl']:.4f} (predicted {best.predicted_kl:.4f}), top-1 {100 * both['top1_agreement']:.1f}%")
        typer.echo(f"  weights alone: KL {w['kl']:.4f} (predicted {best.weight_kl:.4f}), perplexity "
                   f"{w['perplexity']:.3f}; KV cache alone: KL {kv['kl']:.4f} (measured on calibration text "
                   f"{best.kv.kl:.4f}); sum {w['kl'] + kv['kl']:.4f} vs both {both['kl']:.4f}")
        typer.echo(f"  memory: weights {format_bytes(weights_measured)} held (predicted {format_bytes(b.weights)}); "
                   f"KV cache after {r['kv_bytes_tokens']} tokens {format_bytes(r['kv_bytes_measured'])} "
                   f"(predicted {format_bytes(kv_pred)})")
        if out is not None:
            typer.echo(f"saved {out} (lowbit.json: kv_cache = {meta['kv_cache']})")
    return measured
