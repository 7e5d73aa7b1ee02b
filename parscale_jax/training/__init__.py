"""Training: the optimizer and the jitted train step (step.py), the loop that logs, evaluates and checkpoints (loop.py), metrics (logger.py) and stop requests (preemption.py)."""
