"""The one base class for expected failures.

Bad input (a config key, a file, a value) raises a subclass of :class:`QGaitError` whose message
names the file, key or value and what was expected. The ``qgait`` command prints such an error as
``qgait <command>: <message>`` and exits with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class QGaitError(Exception):
    """An expected failure whose message is meant for the user (no traceback needed)."""


class ConfigError(QGaitError, ValueError):
    """A config section, key or value that cannot be used as written."""


class InputNotFound(QGaitError, FileNotFoundError):
    """A file or folder the command needs (named by the user, or made by an earlier step) is not there."""
