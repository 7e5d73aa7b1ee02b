"""The errors a command ends with, each printed by the CLI as one line (tracebacks only with --debug).

A mistake in what the user asked for exits with status 2: a config value or flag (`ConfigError`,
which names the key), a corpus, tokenizer or file (`DataError`). A run whose own files or numbers
fail it exits with status 1: a checkpoint that cannot be written or read (`CheckpointError`), a
non-finite step under `train.on_nonfinite=stop` (`NonFiniteError`).
"""


class ConfigError(ValueError):
    """A config value or command-line flag is missing, unknown, mistyped or inconsistent. `key` is
    its dotted name (`model.parscale_n`) or its flag (`--run-dir`)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(ValueError):
    """The corpus, a tokenizer or another input file cannot be used; the message says which and why."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the step and, when known, the file."""


class NonFiniteError(RuntimeError):
    """A step's loss or gradients were NaN or Inf under `train.on_nonfinite=stop`."""


USER_ERRORS = (ConfigError, DataError, FileNotFoundError)  # exit status 2
RUN_ERRORS = (CheckpointError, NonFiniteError)  # exit status 1
