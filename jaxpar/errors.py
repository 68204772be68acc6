"""Errors a user can cause. Every one is a ValueError, so callers may catch either."""


class JaxparError(ValueError):
    """Bad input from a user: a file, a CLI option, an API argument. The message names what and the numbers."""


class MeshFileError(JaxparError):
    """A mesh file that cannot be read or does not describe a valid layout."""


class ConfigError(JaxparError):
    """A model config with unknown or inconsistent fields."""


class LayoutError(JaxparError):
    """A mesh the model cannot be laid out on (a dimension does not divide, ...)."""


class CheckpointError(JaxparError):
    """A missing checkpoint, or one that does not match the model config."""


class GenerationError(JaxparError):
    """Bad generation arguments (max_new_tokens, temperature, top-k, top-p, prompt length)."""


class HardwareError(JaxparError):
    """A hardware preset name or hardware file that cannot be used."""
