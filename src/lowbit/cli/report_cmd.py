"""`lowbit report ORIGINAL CKPT... -o DIR`: every checkpoint against the original, with plots."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        original: str = typer.Argument(..., help="the original model (folder, .gguf or 'default')"),
        checkpoints: list[str] = typer.Argument(..., help="quantized checkpoints: lowbit, gptq, awq, "
                                                          "compressed-tensors, bnb-nf4 folders or .gguf files"),
        out: Path = typer.Option(..., "-o", "--out", help="output folder (report.json/.md/.html, PNG plots)"),
        overwrite: bool = typer.Option(False, help="replace OUT if it holds an earlier report"),
        label: list[str] = typer.Option([], "--label", help="name of each checkpoint in the tables, in order "
                                                            "(default: its file name)"),
        text: str = typer.Option("pydoc", help="evaluation text source (its held-out part, as lowbit eval)"),
        seq_len: int = typer.Option(512, min=2, help="tokens per evaluation window"),
        windows: int = typer.Option(16, min=1, help="number of evaluation windows"),
        speed: bool = typer.Option(True, "--speed/--no-speed", help="measure decode and prefill tokens/s"),
        decode_tokens: int = typer.Option(32, min=1, help="new tokens per timed decode"),
        prefill_len: int = typer.Option(256, min=1, help="prompt tokens of the timed prefill"),
        tasks: bool = typer.Option(True, "--tasks/--no-tasks", help="multiple-choice tasks (lm-eval where its "
                                                                    "data loads offline, else lowbit's own)"),
        lm_eval_tasks: str = typer.Option("arc_easy,piqa,hellaswag,lambada_openai,winogrande",
                                          help="lm-eval tasks to try (comma-separated; '' for none)"),
        lm_eval_limit: int = typer.Option(100, min=1, help="documents per lm-eval task"),
        task_questions: int = typer.Option(100, min=1, help="questions of lowbit's own task"),
        layer_windows: int = typer.Option(4, min=0, help="calibration windows for per-layer errors of "
                                                         "checkpoints that store none (0: skip)"),
        seed: int = typer.Option(0, help="seed of the task questions and calibration windows"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ):
        """Report every CKPT against ORIGINAL: report.json, report.md, report.html and PNG plots."""
        from lowbit.eval.report import ReportOptions, build_report, check_report_inputs, write_report

        check_report_inputs(original, checkpoints, out, overwrite, text)
        opts = ReportOptions(text=text, seq_len=seq_len, windows=windows, speed=speed, decode_tokens=decode_tokens,
                             prefill_len=prefill_len, tasks=tasks,
                             lm_eval_tasks=tuple(t.strip() for t in lm_eval_tasks.split(",") if t.strip()),
                             lm_eval_limit=lm_eval_limit, task_questions=task_questions,
                             layer_windows=layer_windows, seed=seed, progress=not quiet, labels=tuple(label))
        result = build_report(original, list(checkpoints), opts)
        write_report(result, out, overwrite=overwrite)
        typer.echo(f"saved {out}: report.md, report.html, report.json and the plots")
