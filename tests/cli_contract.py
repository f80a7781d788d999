"""The command line's contract, shared by the tests that drive it: run `kiln` in this process
(no import cost), and a user mistake is exactly one `error: ...` line on stderr."""

from __future__ import annotations

from click.testing import CliRunner

from kiln.compiler.cli import main


def invoke(*args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr). Any exception other than the CLI's own sys.exit would have
    been a traceback on the console."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__} escaped the CLI: {result.exception}"
    )
    return result.exit_code, result.stdout, result.stderr


def one_error(code: int, out: str, err: str, *needles: str, quiet: bool = True) -> str:
    """Asserts the one-line-error contract and returns the line. `quiet`: nothing on stdout
    either (a command that printed progress first passes False)."""
    assert code != 0, (out, err)
    assert "Traceback" not in out + err, err
    if quiet:
        assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: ") :].strip(), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line
