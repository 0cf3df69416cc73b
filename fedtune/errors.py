"""Exceptions raised for bad user input, each naming what is wrong."""


class FedtuneError(Exception):
    """Base class for fedtune's user-facing errors."""


class ConfigError(FedtuneError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class PlanError(FedtuneError, ValueError):
    """No plan satisfies the method and the device budget."""


class CheckpointError(FedtuneError, ValueError):
    """A checkpoint is missing, corrupt or does not match the model."""
