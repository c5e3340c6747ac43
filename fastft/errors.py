"""The one error family and the exit codes of the ``fastft`` command.

Every error a user can act on is a ``FastftError``: its message names the problem and the fix, and
its ``exit_code`` is what ``fastft`` exits with. ``fastft.cli.main`` catches the family once and
prints ``fastft: error: <message>``; library code raises and never exits.

    0  done                      2  bad recipe, data, reference or command line
    1  the run failed            3  an eval gate failed, or an export does not answer like the merged model
    130 / 143  stopped by SIGINT / SIGTERM after writing a checkpoint
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_GATE = 3


class FastftError(Exception):
    """An error with a message for the user and the exit code ``fastft`` ends with (default 2)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, *args, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class TrainError(FastftError, RuntimeError):
    """A run that cannot go on; the message says what to change."""

    exit_code = EXIT_FAILED
