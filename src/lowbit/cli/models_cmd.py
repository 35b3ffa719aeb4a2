"""`lowbit quantize` and `lowbit eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def parse_option_args(items: list[str]) -> dict:
    """`--option key=value` strings -> {key: value}, values read as YAML scalars (0.02, true, [a, b])."""
    import yaml

    from lowbit.errors import LowbitError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LowbitError(f"--option {item!r} must look like KEY=VALUE, e.g. --option damp=0.02")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LowbitError(f"--option {item!r}: cannot read the value {value!r}") from None
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: str = typer.Argument(..., help="model folder, .gguf file, hub name, or 'default'"),
        out: Path = typer.Option(..., "-o", "--out", help="output folder"),
        method: str = typer.Option("gptq", help="gptq | awq | awq+gptq | hqq | rtn"),
        bits: int = typer.Option(4, help="2..8"),
        group_size: int = typer.Option(64, help="group size along the input dimension; 0 = per channel"),
        sym: bool = typer.Option(True, "--sym/--asym", help="symmetric or asymmetric integers"),
        dtype: str = typer.Option("int", help="int | nf4 | fp4 | fp8_e4m3 | fp8_e5m2"),
        float_zero: bool = typer.Option(False, "--float-zero",
                                        help="asymmetric: float zero points (group min exact, as Q4_1/HQQ)"),
        option: list[str] = typer.Option([], "--option", help="method option KEY=VALUE (repeatable), e.g. damp=0.02"),
        fmt: str = typer.Option("lowbit", "--format", help="output format: lowbit | gptq | awq | compressed-tensors "
                                                           "| bnb-nf4 | gguf"),
        format_option: list[str] = typer.Option([], "--format-option", help="format option KEY=VALUE (repeatable)"),
        recipe: Optional[Path] = typer.Option(None, help="YAML recipe (overrides --method/--bits/...)"),
        quantize_head: bool = typer.Option(False, "--quantize-head", help="also quantize lm_head (body's spec)"),
        head_bits: Optional[int] = typer.Option(None, "--head-bits", help="also quantize lm_head at this width "
                                                                         "(8: int8 per channel)"),
        embed_bits: Optional[int] = typer.Option(None, "--embed-bits", help="hold the input embedding as an "
                                                 "int8 table (8; groups of 32 as llama.cpp's Q8_0; a tied head "
                                                 "needs --head-bits too)"),
        ignore: list[str] = typer.Option([], help="regex of module names to keep in full precision"),
        calib: Optional[str] = typer.Option(None, help="calibration text: pydoc (default), a file/folder, "
                                                         "or a dataset name"),
        samples: Optional[int] = typer.Option(None, min=1, help="calibration samples (default 64; an encoder: "
                                                                "512 sentences, or 64 windows)"),
        calib_shape: str = typer.Option("sentences", help="encoders: calibrate on the text's sentences "
                                                           "(default) or on --seq-len-token windows"),
        seq_len: Optional[int] = typer.Option(None, min=1, help="calibration sample length in tokens (default 512; "
                                                                "128 for an encoder)"),
        overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
        state_dir: Optional[Path] = typer.Option(None, help="calibrated methods: save state after each block "
                                                           "here and resume an interrupted run from it "
                                                           "(default: .OUT.lowbit-state beside OUT, removed "
                                                           "after the save)"),
        low_memory: bool = typer.Option(False, "--low-memory", help="lower peak memory, slower (unmaps large "
                                                                    "temporaries at once)"),
        scheme: Optional[str] = typer.Option(None, help="weights + activations: w8a8-dynamic | w8a8-static | w4a8 "
                                                        "(replaces --method / --bits ...)"),
        observer: Optional[str] = typer.Option(None, help="w8a8-static: minmax (default) | moving_average | "
                                                          "percentile | mse | entropy"),
        smoothquant: Optional[str] = typer.Option(None, help="SmoothQuant migration strength alpha in [0, 1], "
                                                             "or 'auto' to search it per layer for the scheme "
                                                             "(with --scheme)"),
        record_stats: bool = typer.Option(False, "--record-stats", help="store the run's time and peak RSS in "
                                                                        "the checkpoint's metadata (for lowbit "
                                                                        "report; files then differ run to run)"),
        target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="mixed precision: one option per "
                                                   "layer for this many bits per weight (GPTQ; replaces --bits / "
                                                   "--group-size / --sym; see `lowbit plan`)"),
        bits_options: str = typer.Option("2,3,4,5,6,8", help="--target-bpw: candidate bit widths"),
        group_options: str = typer.Option("32,64,128,0", help="--target-bpw: candidate group sizes (0 = per channel)"),
        option_symmetry: str = typer.Option("auto", help="--target-bpw: auto (asym below 4 bits) | sym | asym"),
        measurement: Optional[Path] = typer.Option(None, help="--target-bpw: measurement JSON to write / reuse"),
    ):
        """Quantize MODEL and save it in lowbit's format."""
        from lowbit import api
        from lowbit.errors import LowbitError
        from lowbit.recipe import load_recipe
        from lowbit.runtime import configure

        if scheme is not None:
            from lowbit.ptq.llm import quantize_act_to
            from lowbit.ptq.smoothquant import parse_alpha

            if recipe is not None or fmt != "lowbit" or embed_bits is not None:
                raise LowbitError("--scheme writes lowbit checkpoints and takes no --recipe / --format / --embed-bits")
            configure(low_memory=low_memory)
            quantize_act_to(model, out, scheme, observer=observer, smoothquant=parse_alpha(smoothquant),
                            calib_text=calib, n_samples=samples or 64, seq_len=seq_len or 512, overwrite=overwrite)
            typer.echo(f"saved {out}")
            return
        if observer is not None or smoothquant is not None:
            raise LowbitError("--observer and --smoothquant go with --scheme (activation quantization)")

        if target_bpw is not None:
            from lowbit.cli.plan_cmd import mixed_measurement
            from lowbit.mixed.apply import check_target, plan_for, plan_recipe

            if recipe is not None or method != "gptq" or dtype != "int":
                raise LowbitError("--target-bpw plans GPTQ integer options per layer; drop --recipe / --method / "
                                  "--dtype")
            check_target(target_bpw)
            configure(low_memory=low_memory)
            meas = mixed_measurement(model, calib=calib, samples=min(samples or 64, 32), seq_len=seq_len,
                                     bits_options=bits_options, group_options=group_options,
                                     measurement=measurement, option=option, option_symmetry=option_symmetry)
            hs = None if head_bits is None else api.head_spec(head_bits, group_size)
            r = plan_recipe(plan_for(meas, target_bpw), meas, options=parse_option_args(option), head_spec=hs)
        elif recipe is not None:
            r = load_recipe(recipe)
        else:
            r = api.make_recipe(method=method, bits=bits, group_size=group_size, symmetric=sym, dtype=dtype,
                                integer_zero=not float_zero, quantize_head=quantize_head, head_bits=head_bits,
                                ignore=tuple(ignore),
                                options=parse_option_args(option))
        if embed_bits is not None:
            import dataclasses

            r = dataclasses.replace(r, embed_spec=api.embed_spec(embed_bits))
        configure(low_memory=low_memory)
        from lowbit.models.encoder import is_encoder_folder, quantize_encoder_to

        if Path(model).expanduser().is_dir() and is_encoder_folder(Path(model).expanduser()):
            if fmt != "lowbit" or state_dir is not None or r.embed_spec is not None:
                raise LowbitError("an encoder is saved as a lowbit module checkpoint: no --format / --state-dir "
                                  "/ --embed-bits")
            quantize_encoder_to(model, out, r, calib_text=calib, n_samples=samples,
                                seq_len=seq_len or 128, calib_shape=calib_shape, overwrite=overwrite)
            typer.echo(f"saved {out}")
            return
        api.quantize_to(model, out, r, calib_text=calib, n_samples=samples or 64, seq_len=seq_len or 512,
                        overwrite=overwrite,
                        state_dir=state_dir, fmt=fmt, format_options=parse_option_args(format_option),
                        record_stats=record_stats)
        typer.echo(f"saved {out}")

    @app.command("eval")
    def eval_(
        original: str = typer.Argument(..., help="the original model (folder, .gguf or 'default')"),
        quantized: str = typer.Argument(..., help="the quantized lowbit checkpoint"),
        text: str = typer.Option("pydoc", help="evaluation text source (its held-out part is used)"),
        seq_len: int = typer.Option(512, min=2, help="tokens per evaluation window"),
        windows: int = typer.Option(16, min=1, help="number of evaluation windows"),
        speed: bool = typer.Option(False, "--speed/--no-speed", help="also measure decode and prefill tokens/s "
                                                                     "(slow; on an idle machine)"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ):
        """Compare QUANTIZED with ORIGINAL: perplexity, KL, top-1 agreement, size, bits, speed."""
        from lowbit.calibration.text import check_text_source
        from lowbit.eval.compare import compare_models, format_table
        from lowbit.models import load_model
        from lowbit.models.loader import default_model_dir, resolve_source

        for source in (original, quantized):  # typos fail before either model loads
            resolve_source(source)
        check_text_source(text)
        orig_model, tokenizer = load_model(original)
        quant_model, _ = load_model(quantized)
        orig_path = default_model_dir() if original == "default" else original
        result = compare_models(orig_model, quant_model, tokenizer, original_path=orig_path,
                                quantized_path=quantized, text=text, seq_len=seq_len, max_windows=windows,
                                speed=speed, progress=not as_json)
        typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))
