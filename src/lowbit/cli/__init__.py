"""`lowbit` command line: quantize, eval, inspect (and kv-eval)."""

from __future__ import annotations

import logging
import sys

import typer

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make models smaller and faster; measure the cost.")


def _register() -> None:
    import importlib.util

    from lowbit.cli import export_cmd, generate_cmd, inspect_cmd, models_cmd

    models_cmd.register(app)
    inspect_cmd.register(app)
    generate_cmd.register(app)
    export_cmd.register(app)
    if importlib.util.find_spec("lowbit.cli.kv") is not None:
        from lowbit.cli import kv

        kv.register(app)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _register()
    try:
        app(standalone_mode=False)
    except LowbitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
