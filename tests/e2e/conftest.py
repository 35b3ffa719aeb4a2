"""Running the real `lowbit` entry point (`lowbit.cli.main`) in-process and checking its output."""

import sys
from dataclasses import dataclass

import pytest


@dataclass
class Run:
    code: int
    out: str
    err: str

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def assert_error(self, *needles: str, code: int = 2) -> str:
        """Exit `code`, exactly one `error:` line on stderr holding every needle, no traceback."""
        assert self.code == code, (self.code, self.err[-2000:])
        assert "Traceback" not in self.err and "Traceback" not in self.out, self.err[-2000:]
        lines = self.error_lines()
        assert len(lines) == 1, self.err[-2000:]
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]


@pytest.fixture
def lowbit_cli(capsys, monkeypatch):
    """lowbit_cli(*args) -> Run: `lowbit ARGS` through lowbit.cli.main, SystemExit caught. The
    CLI's process-wide settings (`lowbit.runtime.configure`: glibc malloc options, which cannot be
    undone) are skipped in-process, so other tests still see an untouched process."""
    import lowbit.runtime
    from lowbit.cli import main

    monkeypatch.setattr(lowbit.runtime, "configure", lambda **kw: {})

    def run(*args) -> Run:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["lowbit", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run

