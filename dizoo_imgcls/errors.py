"""Which exceptions are the user's to fix, and the one place the command-line tools report them.

An exception class derived from ``UserError`` says: the input is wrong (a setting, an option, a file, a path, the
data), and the message names it and what was expected, in one line. ``report_user_errors`` prints that line and
exits with the class's ``exit_code``. Any other exception (a ``ValueError`` included) is a bug, ours or a
library's, and keeps its traceback.
"""
import sys
from typing import Any, Callable


class UserError(Exception):
    """Bad input the user can fix; the message says which and what was expected."""

    exit_code = 2


class SettingError(UserError, ValueError):
    """An invalid setting, option or value the user gave (still a ``ValueError`` for code that catches those)."""


def report_user_errors(run: Callable[[Any], int], args: Any) -> int:
    """``run(args)``'s exit status; a ``UserError`` from anywhere inside becomes ``error: <message>`` on stderr
    and the error's ``exit_code``. Everything else propagates with its traceback."""
    try:
        return run(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
