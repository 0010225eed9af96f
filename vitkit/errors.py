"""vitkit's error family: problems a user can fix, each with a message that says what to do.

Everything the library raises on bad input, bad data, bad weights or a failed run is a
:class:`VitkitError`; the CLI prints its message and exits 2 without a traceback. Anything
else that escapes is a bug. The subclasses also derive from the built-in exception that the
same failure raised before (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so code
that catches those keeps working.
"""

from __future__ import annotations


class VitkitError(Exception):
    """Base class: a problem with the input, the data, the weights or the run, not a bug."""


class ConfigError(VitkitError, ValueError):
    """A config key, value, argument or combination of options is invalid."""


class PathNotFoundError(VitkitError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class DataError(VitkitError, ValueError):
    """A dataset cannot be read: unknown layout, corrupt archive, too many broken files."""


class WeightsError(VitkitError, ValueError):
    """A weights or checkpoint file is corrupt, unsafe, or does not fit the model."""


class RunDirError(VitkitError, ValueError):
    """A run directory is in a state that the requested action would damage or cannot use."""


class TrainingError(VitkitError, RuntimeError):
    """Training cannot go on: non-finite loss or weights, a missing device, a failed process."""


__all__ = [
    "ConfigError",
    "DataError",
    "PathNotFoundError",
    "RunDirError",
    "TrainingError",
    "VitkitError",
    "WeightsError",
]
