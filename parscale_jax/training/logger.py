"""Metrics to tensorboardX and to `RUN_DIR/metrics.jsonl`, one JSON object per logged step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from parscale_jax.files import write_atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._drop_lines_after(resume_step)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _drop_lines_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; forget their first logging."""
        if not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(self.jsonl_path, "".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = metrics["step"]
        for name, value in metrics.items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a kill mid-write counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
