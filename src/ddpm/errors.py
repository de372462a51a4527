"""The errors a user can cause and fix. Each message is one line that names the bad value and what to do;
the commands print it as ``ddpm-<command>: error: <message>`` and exit with status 2."""

from __future__ import annotations


class DdpmError(Exception):
    """A fault in what the user gave (a config value, a file, a data set), not a bug of this tool."""


class ConfigError(DdpmError):
    """A bad value in the config or on the command line."""


class CheckpointError(DdpmError):
    """A file that is missing, unreadable, unsafe, or not a checkpoint of this tool."""


class DataError(DdpmError):
    """The data named by the config cannot be read."""


class FeatureError(DdpmError):
    """A feature network for evaluation that cannot be built here."""
