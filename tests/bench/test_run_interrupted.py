"""A run stopped from outside — Ctrl-C, a full disk — ends with one line that says nothing finished is lost and
how to resume (the traceback only with --debug), not with a raw traceback."""
from __future__ import annotations

import errno

import pytest

from bench import run as run_mod

ARGV = ["--model", "gmm2d", "--steps", "1", "--num-samples", "4"]


def _stopped_by(monkeypatch, error: BaseException) -> None:
    def stopped(argv):
        raise error
    monkeypatch.setattr(run_mod, "run", stopped)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_ctrl_c_is_one_line_with_the_shells_status_and_says_how_to_resume(monkeypatch, capsys):
    _stopped_by(monkeypatch, KeyboardInterrupt())
    assert run_mod.main(ARGV) == 130
    err = _one_line(capsys)
    assert err.startswith("bench.run: error: interrupted (Ctrl-C)") and "run the same command again" in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_naming_the_file_and_how_to_resume(monkeypatch, capsys, code):
    _stopped_by(monkeypatch, OSError(code, "No space left on device", "/runs/gmm2d/results.csv"))
    assert run_mod.main(ARGV) == 1
    err = _one_line(capsys)
    assert "No space left on device (/runs/gmm2d/results.csv)" in err and "run the same command again" in err


def test_with_debug_the_traceback_comes_first(monkeypatch, capsys):
    _stopped_by(monkeypatch, KeyboardInterrupt())
    assert run_mod.main([*ARGV, "--debug"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("bench.run: error: interrupted")


def test_other_os_errors_are_not_disguised_as_a_full_disk(monkeypatch):
    _stopped_by(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/x"))
    with pytest.raises(PermissionError):
        run_mod.main(ARGV)
