"""The user-error contract, checked in one place: exit code 2, one line on stderr, no traceback."""
import pytest

from rdprune.cli.common import run_cli
from rdprune.run import main


def user_error(capsys, argv: list[str]) -> str:
    """Run ``python -m rdprune.run ARGV`` in-process; assert it fails as a user error; return the line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err.strip()
