"""`import --calibrate N`: the new streams trained alone, for N steps, to give the backbone's own
next-token distribution (KL divergence from it), before any training on the data's targets.

The context prefixes (recycle.py) start the streams near the backbone; what remains is the effect
of reading a context before every row, a few hundredths of a nat that depends on the text. A few
calibration steps take it out while the streams stay different from each other.
"""

from __future__ import annotations

import itertools

import jax
import optax

from parscale_jax.config import Config
from parscale_jax.data import pipeline
from parscale_jax.layout import Layout
from parscale_jax.recycle import kl_from_backbone

# Adam's step size (measured on SmolLM2-135M: docs/recycling.md).
CALIBRATION_LR = 1e-3


def calibrate(config: Config, layout: Layout, streams: dict, backbone: dict, steps: int,
              lr: float = CALIBRATION_LR) -> tuple[dict, list[float]]:
    """(`streams` after `steps` Adam steps that train only them to give the `backbone`'s own
    next-token distribution, the KL divergence of each step, nats per token). The batches are the
    run's first training batches; the backbone does not change."""
    optimizer = optax.adam(lr)

    @jax.jit
    def step(streams, opt_state, backbone, batch):
        value, grads = jax.value_and_grad(kl_from_backbone)(streams, backbone, config, batch)
        updates, opt_state = optimizer.update(grads, opt_state, streams)
        return optax.apply_updates(streams, updates), opt_state, value

    batches = layout.placed(itertools.islice(pipeline.train_dataset(config), steps), config.train.batch_size)
    opt_state, divergences = optimizer.init(streams), []
    for batch in batches:
        streams, opt_state, value = step(streams, opt_state, backbone, batch)
        divergences.append(float(value))
    return streams, divergences
