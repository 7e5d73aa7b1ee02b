"""Errors a run can end with that are not about its command line: the CLI prints them as one line
and exits 1 (command-line and config mistakes are `config.ConfigError`, exit 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the step and, when known, the file."""


class NonFiniteError(RuntimeError):
    """A step's loss or gradients were NaN or Inf under `train.on_nonfinite=stop`."""
