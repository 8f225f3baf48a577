"""What a user did wrong, as exceptions the app layer turns into one line and an exit code.

They live apart from the app layer so that every module, however low, can raise them without
importing Hydra or MLflow.
"""

from __future__ import annotations

# What to set for labels, in every message of a stage that needs them (cluster's k and NMI, probe).
LABEL_KEYS = "dataset.labels_from_folders=true or dataset.label_column=<column>"


class ConfigError(ValueError):
    """A mistake in the config or its inputs: one line on stderr, exit code 2, nothing written."""

    exit_code = 2


class TooManyFailures(ConfigError):
    """Most images fail: a wrong config, not bad data. Exit code 3."""

    exit_code = 3


class OutputBusy(ConfigError):
    """Another live process is writing the same outputs: wait for it, or write elsewhere."""
