"""Errors that the CLI turns into one clear message instead of a traceback."""


class DladiffError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class ConfigError(DladiffError):
    """A configuration file is malformed, has unknown keys or values of the wrong type."""


class InputError(DladiffError):
    """An input folder or file cannot be used."""


class ModelUnavailableError(DladiffError):
    """A model (hub id or local folder) cannot be loaded, e.g. offline or weights missing."""


class BoundViolationError(DladiffError):
    """A saved output exceeds the perturbation bound: the file is not written."""
