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
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        self.directory = Path(run_dir).absolute() / "checkpoints"
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

    def restore_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
