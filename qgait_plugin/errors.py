"""The one base class for expected failures, and the helper that keeps their messages short.

Bad input (a config key, a file, a value) raises a subclass of :class:`QGaitError` whose message
names the file, key or value and what was expected. The ``qgait`` command prints such an error as
``qgait <command>: <message>`` and exits with code 2; anything else is a bug and keeps its traceback.

A message quotes values through :func:`short_repr`, never a bare ``repr``: a value can be huge (a
YAML alias bomb, a long list pasted into the wrong key), and expanding it into a message would cost
the memory and time the user's mistake already costs, for a message nobody can read.
"""
from __future__ import annotations

import reprlib
from typing import Any

#: longest quoted value in a message, in characters
REPR_LIMIT = 200
#: longest ConfigError message, in characters (a last guard; values are already quoted short)
MESSAGE_LIMIT = 2000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 120


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, at a cost bounded whatever the value's size.

    Containers show their first few items and ``...`` (nested at most three deep), so a value built
    from a million shared references costs no more than a small one.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class QGaitError(Exception):
    """An expected failure whose message is meant for the user (no traceback needed)."""


class ConfigError(QGaitError, ValueError):
    """A config section, key or value that cannot be used as written."""

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MESSAGE_LIMIT:
            args = (args[0][: MESSAGE_LIMIT - 3] + "...",)
        super().__init__(*args)


class InputNotFound(QGaitError, FileNotFoundError):
    """A file or folder the command needs (named by the user, or made by an earlier step) is not there."""


class NonFiniteError(QGaitError, ArithmeticError):
    """Training or evaluation met NaN or infinity (a diverged run); the message names where."""


class OutputExists(QGaitError, FileExistsError):
    """A command would replace outputs of an earlier run; the message names them and how to allow it."""


class OutputError(QGaitError, OSError):
    """An output that cannot be written (no permission, a full disk, a read-only file system); the message
    names the file or folder and the system's reason. Files written before it stay as they were."""


class OutputBusy(QGaitError):
    """Another live process is writing into the same output folder; the message names its pid."""


class DamagedFile(QGaitError):
    """A file this package wrote whose content no longer verifies (a flipped bit, a cut-off write); the
    message names the file and the damaged part."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT or SIGTERM after keeping what it had finished; the message says what was
    kept and how to resume. A KeyboardInterrupt, so code that handles Ctrl-C handles it too."""
