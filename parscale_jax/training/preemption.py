"""SIGTERM and SIGINT as requests to stop: the loop finishes its step, saves and exits cleanly.

Preemptible TPUs and SLURM send SIGTERM some seconds before killing a job. The first signal only
sets a flag that the training loop reads after each step; a second one exits at once, which is
safe because a checkpoint becomes visible only once it is complete. With several processes the
flag is gathered from all of them after every step, so all of them stop after the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """A context that turns SIGTERM/SIGINT into a stop request for the duration of a run."""

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python handles signals only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self) -> str | None:
        """The signal's name if any process received one, the same answer on every process."""
        local = np.int32(-1 if self.received is None else self.received)
        if jax.process_count() == 1:
            received = int(local)
        else:
            received = int(np.max(multihost_utils.process_allgather(local)))
        return None if received < 0 else signal.Signals(received).name
