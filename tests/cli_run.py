"""Running `cmvae` in the test's own process, and checking what it says on failure."""

from __future__ import annotations

from cmvae.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """`cmvae ARGS` in this process: exit status, stdout, stderr."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, command: str) -> str:
    """The error line, after checking that it is the only one and that no traceback came with it."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"cmvae {command}: error: "), err
    return errors[0]
