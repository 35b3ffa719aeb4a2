"""`lowbit` command line: quantize, plan, eval, inspect, export, generate, report, finetune (and kv-eval).

Exit codes: 0 done; 2 bad input or usage (one `error: ...` line on stderr, nothing written);
130 interrupted (Ctrl-C; rerunning the same command resumes); 1 anything else: out of memory, a
failed write (disk full), an internal error (one line; `LOWBIT_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make models smaller and faster; measure the cost.")

DEBUG_ENV = "LOWBIT_DEBUG"
INTERRUPTED = "interrupted; rerun the same command to resume"


def _register() -> None:
    import importlib.util

    from lowbit.cli import (export_cmd, finetune_cmd, fit_cmd, generate_cmd, inspect_cmd, models_cmd, plan_cmd,
                            qat_cmd, report_cmd)

    if app.registered_commands:  # main() called again in the same process
        return
    models_cmd.register(app)
    plan_cmd.register(app)
    fit_cmd.register(app)
    inspect_cmd.register(app)
    generate_cmd.register(app)
    export_cmd.register(app)
    report_cmd.register(app)
    finetune_cmd.register(app)
    qat_cmd.register(app)
    if importlib.util.find_spec("lowbit.cli.kv") is not None:
        from lowbit.cli import kv

        kv.register(app)


def _click_exceptions() -> tuple[type, type, type]:
    """(ClickException, UsageError, NoArgsIsHelpError) as typer raises them: typer >= 0.2x vendors
    its own click (`typer._click`), whose classes are not the `click` package's."""
    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:  # an older typer on the real click
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    return ClickException, UsageError, NoArgsIsHelpError


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _usage_error(e) -> None:
    ctx = getattr(e, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    _fail(f"{e.format_message()}{hint}")


def _run() -> int:
    """Run the app; returns its exit code (typer returns Exit codes, e.g. 130 for Ctrl-C, instead of
    raising them when not in standalone mode)."""
    code = app(standalone_mode=False, prog_name="lowbit")
    return code if isinstance(code, int) else 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ClickException, UsageError, NoArgsIsHelpError = _click_exceptions()
    try:
        _register()
        code = _run()
    except LowbitError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"no such file or folder: {e.filename or e}")
    except PermissionError as e:
        _fail(f"permission denied: {e.filename or e}")
    except NoArgsIsHelpError as e:
        typer.echo(e.format_message())  # the help, on stdout
        _fail("no command given; choose one of the commands above (`lowbit COMMAND --help` for its options)")
    except UsageError as e:
        _usage_error(e)
    except ClickException as e:
        _fail(e.format_message())
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except MemoryError:
        _fail("out of memory; try --low-memory, fewer --samples or a shorter --seq-len", 1)
    except OSError as e:  # disk full, I/O error: not bad input, not a bug
        if os.environ.get(DEBUG_ENV):
            raise
        _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)
    except Exception as e:  # a bug, not bad input: one line unless debugging
        if os.environ.get(DEBUG_ENV):
            raise
        _fail(f"internal error: {type(e).__name__}: {e}; rerun with {DEBUG_ENV}=1 for the traceback "
              "and report it", 1)
    if code == 130:
        typer.echo(INTERRUPTED, err=True)
    sys.exit(code)
