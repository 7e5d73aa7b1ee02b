"""Orbax checkpoints of a run: train state, the Grain iterator's position, and the config.

Orbax writes each step into a temporary folder and renames it when complete, so `latest_step`
only ever sees finished checkpoints; a run killed mid-save resumes from the one before, and the
leftover temporary folder is removed on the next start. Old checkpoints are deleted only after a
new one is complete, so a save that fails (a full disk) leaves the previous one in place.

Once a step is on disk we record the size of each of its files in `.manifests/<step>.json`;
restoring checks them first, so a truncated or deleted file is named instead of surfacing as an
error deep inside Orbax or TensorStore.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from parscale_jax.config import CheckpointConfig
from parscale_jax.errors import CheckpointError
from parscale_jax.files import write_atomic


def complete_steps(directory: Path) -> list[int]:
    """The steps saved completely in `directory`, read from the disk without opening a manager:
    Orbax gives a step folder its bare number only once everything in it is written."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class Checkpointer:
    """The step checkpoints in one directory (`runs.Run.checkpoint_dir` says which)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self._saving: int | None = None  # the step an asynchronous save is writing
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=self.cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- writing

    def save(self, step: int, state: Any, data_iter: Any, config: dict[str, Any]) -> None:
        """Start saving (asynchronously when configured); `wait` blocks until it is on disk."""
        self.wait()  # for the previous save, and record its files
        self._saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config),
            ))
        except Exception as err:  # anything Orbax or the file system raises: say what is still safe
            raise self._save_failed(step, err) from err
        if not self.cfg.async_save:
            self.wait()

    def wait(self) -> None:
        """Block until the last save is on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(self._saving, err) from err
        self._saving = None
        self._write_manifests()

    def _save_failed(self, step: int, err: Exception) -> CheckpointError:
        previous = max([s for s in complete_steps(self.directory) if s != step], default=None)
        kept = "no earlier checkpoint exists" if previous is None else f"the checkpoint of step {previous} is intact"
        return CheckpointError(f"saving step {step} in {self.directory} failed ({_first_line(err)}); {kept}. "
                               "Free space or fix the cause, then run the same command to resume")

    def _manifest_path(self, step: int) -> Path:
        return self.directory / ".manifests" / f"{step}.json"

    def _write_manifests(self) -> None:
        """Record the files of every finished step that has no record yet; forget deleted steps."""
        if jax.process_index() != 0:
            return
        steps = self.all_steps()
        folder = self.directory / ".manifests"
        folder.mkdir(exist_ok=True)
        for step in steps:
            path = self._manifest_path(step)
            if path.exists():
                continue
            step_dir = self.directory / str(step)
            sizes = {str(f.relative_to(step_dir)): f.stat().st_size for f in sorted(step_dir.rglob("*")) if f.is_file()}
            write_atomic(path, json.dumps(sizes, indent=1))
        for stale in folder.glob("*.json"):
            if int(stale.stem) not in steps:
                stale.unlink()

    # -- reading

    def verify(self, step: int) -> None:
        """Raise a CheckpointError naming the first missing or truncated file of `step`, if any."""
        path = self._manifest_path(step)
        if not path.is_file():  # killed between the save and its record: Orbax's own checks remain
            return
        step_dir = self.directory / str(step)
        for name, size in json.loads(path.read_text()).items():
            file = step_dir / name
            if not file.is_file():
                raise self._damaged(step, f"{file} is missing")
            if file.stat().st_size != size:
                raise self._damaged(step, f"{file} is truncated or altered ({file.stat().st_size} of {size} bytes)")

    def _damaged(self, step: int, what: str) -> CheckpointError:
        earlier = [s for s in self.all_steps() if s < step]
        hint = (f"; run again with --fallback to resume from step {earlier[-1]}, the previous checkpoint"
                if earlier else "; no earlier checkpoint exists")
        return CheckpointError(f"checkpoint of step {step} is damaged: {what}{hint}")

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        self.verify(step)
        try:
            return self.manager.restore(step, args=args)
        except Exception as err:  # a file the record could not cover: Orbax's message, with the step
            raise self._damaged(step, f"{self.directory / str(step)} cannot be read ({_first_line(err)})") from err

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """The train state at `step`, laid out like `abstract_state`; moves `data_iter` there too."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._read(step, ocp.args.Composite(**items)).state

    def restore_part(self, step: int, abstract_part: Any) -> Any:
        """Only the part of the train state that `abstract_part` names (e.g. the parameters, without
        the optimizer state), laid out like it; the rest is not read."""
        args = ocp.args.PyTreeRestore(item=abstract_part, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part))
        return self._read(step, ocp.args.Composite(state=args)).state

    def set_aside(self, step: int) -> Path:
        """Move a damaged step out of the way (never delete it) so training can go on from an earlier one."""
        target = self.directory.parent / f"{self.directory.name}.damaged" / f"{step}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            (self.directory / str(step)).rename(target)
            self._manifest_path(step).unlink(missing_ok=True)
        self.manager.close()
        self._open()
        return target

    def close(self) -> None:
        self.manager.close()


def _first_line(err: Exception) -> str:
    """An error's first line, shortened in the middle: TensorStore puts the OS error at the very end."""
    line = (str(err).strip() or type(err).__name__).splitlines()[0]
    return line if len(line) <= 300 else f"{line[:150]} ... {line[-140:]}"


def save_params(directory: str | Path, params: Any) -> None:
    """Write a parameter tree once (e.g. an imported backbone); Orbax renames it into place when done."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), params)


def restore_params(directory: str | Path, abstract_params: Any) -> Any:
    """A tree written by `save_params`, laid out like `abstract_params` (shardings included)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(directory).absolute(), abstract_params)
