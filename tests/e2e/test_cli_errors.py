"""Exit codes and messages of the `lowbit` entry point: usage errors, Ctrl-C, internal errors."""

import subprocess
import sys
from pathlib import Path

import pytest

LOWBIT = Path(sys.executable).parent / "lowbit"  # the installed console script


@pytest.mark.parametrize("args, needle", [
    ([], "no command given"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["quantize"], "Missing argument 'model'"),
    (["quantize", "default"], "Missing option '-o'"),
    (["quantize", "default", "-o", "{out}", "--bitz", "4"], "No such option: --bitz"),
    (["quantize", "default", "-o", "{out}", "--bits", "abc"], "'--bits'"),
    (["quantize", "default", "-o", "{out}", "--samples", "0"], "'--samples'"),
    (["quantize", "default", "-o", "{out}", "--seq-len", "0"], "'--seq-len'"),
    (["quantize", "default", "-o", "{out}", "--embed-bits", "4"], "int8 only (--embed-bits 8)"),
    (["quantize", "default", "-o", "{out}", "--embed-bits", "8"], "quantize the head too (--head-bits 8)"),
    (["eval", "default", "{out}", "--windows", "0"], "'--windows'"),
    (["eval", "default", "{out}", "--seq-len", "1"], "'--seq-len'"),
    (["kv-eval", "default", "--seq-len", "0"], "'--seq-len'"),
    (["kv-eval", "default", "--windows", "0"], "'--windows'"),
])
def test_usage_errors_are_one_line_exit_2(lowbit_cli, tmp_path, args, needle):
    out = tmp_path / "out"
    r = lowbit_cli(*[a.format(out=out) for a in args])
    r.assert_error(needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_no_arguments_prints_the_help_on_stdout(lowbit_cli):
    r = lowbit_cli()
    r.assert_error("no command given")
    assert "quantize" in r.out and "eval" in r.out


@pytest.mark.parametrize("args", [[], ["quantize", "default", "-o", "x", "--bitz", "4"]])
def test_installed_console_script(args, tmp_path):
    """The real `lowbit` executable: one error line, exit 2 (typer's own click, not the click package)."""
    r = subprocess.run([str(LOWBIT), *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0(lowbit_cli):
    r = lowbit_cli("quantize", "--help")
    assert r.code == 0 and "--calib" in r.out and not r.error_lines()


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    """A real SIGINT in the middle of a command: exit 130 and the resume hint, no traceback."""
    code = ("import os, signal, time\n"
            "import lowbit.api as api\n"
            "def quantize_to(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "api.quantize_to = quantize_to\n"
            "from lowbit.cli import main\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code, "quantize", "default", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert "interrupted; rerun the same command to resume" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_unexpected_exception_is_one_line_exit_1(lowbit_cli, monkeypatch, tmp_path):
    import lowbit.api

    def boom(*a, **k):
        raise RuntimeError("something broke")

    monkeypatch.setattr(lowbit.api, "quantize_to", boom)
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    r = lowbit_cli("quantize", "default", "-o", tmp_path / "out")
    line = r.assert_error("internal error: RuntimeError: something broke", "LOWBIT_DEBUG=1", code=1)
    assert line.startswith("error: internal error")
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        lowbit_cli("quantize", "default", "-o", tmp_path / "out")


def test_multi_line_messages_become_one_line(lowbit_cli, monkeypatch, tmp_path):
    import lowbit.api
    from lowbit.errors import LowbitError

    def bad(*a, **k):
        raise LowbitError("first line\nsecond line")

    monkeypatch.setattr(lowbit.api, "quantize_to", bad)
    r = lowbit_cli("quantize", "default", "-o", tmp_path / "out")
    assert r.assert_error() == "error: first line second line"



@pytest.mark.parametrize("exc, needle, code", [
    (OSError(28, "No space left on device", "/data/out"), "error: No space left on device: /data/out", 1),
    (PermissionError(13, "Permission denied", "/data/model"), "error: permission denied: /data/model", 2),
    (FileNotFoundError(2, "No such file or directory", "/data/tok.json"), "error: no such file or folder: /data/tok.json", 2),
])
def test_os_errors_are_one_line(lowbit_cli, monkeypatch, tmp_path, exc, needle, code):
    import lowbit.api

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(lowbit.api, "quantize_to", fail)
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    assert lowbit_cli("quantize", "default", "-o", tmp_path / "out").assert_error(code=code) == needle
