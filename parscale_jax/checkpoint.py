"""Orbax checkpoints of a run: train state, the Grain iterator's position, and the config.

Orbax writes each step into a temporary folder and renames it when complete, so `latest_step`
only ever sees finished checkpoints; a run killed mid-save resumes from the one before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from parscale_jax.config import CheckpointConfig


class Checkpointer:
    """The step checkpoints in one directory (`train.checkpoint_dir` says which)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, config: dict[str, Any]) -> None:
        """Start saving (asynchronously when configured); `wait` blocks until it is on disk."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config),
        ))

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """The train state at `step`, laid out like `abstract_state`; moves `data_iter` there too."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_part(self, step: int, abstract_part: Any) -> Any:
        """Only the part of the train state that `abstract_part` names (e.g. the parameters, without
        the optimizer state), laid out like it; the rest is not read."""
        args = ocp.args.PyTreeRestore(item=abstract_part, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part))
        return self.manager.restore(step, args=ocp.args.Composite(state=args)).state

    def restore_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_params(directory: str | Path, params: Any) -> None:
    """Write a parameter tree once (e.g. an imported backbone); Orbax renames it into place when done."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), params)


def restore_params(directory: str | Path, abstract_params: Any) -> Any:
    """A tree written by `save_params`, laid out like `abstract_params` (shardings included)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(directory).absolute(), abstract_params)
