"""`lowbit plan`: the mixed-precision plan for a bits-per-weight target, without quantizing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

BITS_HELP = "candidate bit widths, comma-separated"
GROUPS_HELP = "candidate group sizes, comma-separated (0 = per channel); those dividing a layer's input apply"


SYM_HELP = "auto: asymmetric below 4 bits, symmetric from 4 | sym | asym (all options)"


def symmetry(value: str):
    from lowbit.errors import LowbitError

    choices = {"auto": None, "sym": True, "asym": False}
    if value not in choices:
        raise LowbitError(f"--option-symmetry must be auto, sym or asym; got {value!r}")
    return choices[value]


def mixed_measurement(model: str, *, calib, samples: int, seq_len: int, bits_options: str, group_options: str,
                      measurement: Optional[Path], option: list[str], option_symmetry: str = "auto"):
    """The measurement `lowbit plan` and `lowbit quantize --target-bpw` share (cached, resumable)."""
    from lowbit.cli.models_cmd import parse_option_args
    from lowbit.mixed.apply import measure_source
    from lowbit.mixed.options import parse_list

    return measure_source(model, calib_text=calib, n_samples=samples, seq_len=seq_len,
                          bits=parse_list(bits_options, "--bits-options"),
                          groups=parse_list(group_options, "--group-options"), symmetric=symmetry(option_symmetry),
                          method_options=parse_option_args(option), path=measurement)


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        model: str = typer.Argument(..., help="model folder, .gguf file, hub name, or 'default'"),
        target_bpw: float = typer.Option(..., "--target-bpw", help="bits per weight over the decoder Linears "
                                                                   "(codes, scales, zeros counted)"),
        bits_options: str = typer.Option("2,3,4,5,6,8", help=BITS_HELP),
        group_options: str = typer.Option("32,64,128,0", help=GROUPS_HELP),
        option_symmetry: str = typer.Option("auto", help=SYM_HELP),
        measurement: Optional[Path] = typer.Option(None, help="measurement JSON to write / reuse (default: "
                                                              "the cache, named by model, data and options)"),
        option: list[str] = typer.Option([], "--option", help="GPTQ option KEY=VALUE (repeatable)"),
        calib: Optional[str] = typer.Option(None, help="calibration text: pydoc (default), a file/folder, "
                                                       "or a dataset name"),
        samples: int = typer.Option(32, min=1, help="calibration samples for the measurement"),
        seq_len: int = typer.Option(512, min=1, help="calibration sample length in tokens"),
        as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    ):
        """Measure each layer under every option (cached), allocate one option per layer for the
        target, print layer, option, bits and measured error. Nothing is quantized."""
        from lowbit.mixed.apply import check_target, format_plan, plan_for
        from lowbit.runtime import configure

        check_target(target_bpw)
        configure()
        meas = mixed_measurement(model, calib=calib, samples=samples, seq_len=seq_len, bits_options=bits_options,
                                 group_options=group_options, measurement=measurement, option=option,
                                 option_symmetry=option_symmetry)
        p = plan_for(meas, target_bpw)
        if as_json:
            typer.echo(json.dumps({"bpw": p.bpw, "budget_bits": p.budget_bits, "bits": p.bits, "params": p.params,
                                   "predicted_kl": p.cost, "gap": p.gap, "choices": p.choices}, indent=2))
        else:
            typer.echo(format_plan(p, meas))
