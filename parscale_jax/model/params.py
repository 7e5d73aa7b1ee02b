"""What every parameter is, declared where it is created: its logical axes and its kind.

Each weight is an `nnx.Param` (or a `ParScaleParam`) carrying two pieces of metadata:
  axes  one logical name per dimension, e.g. `("embed", "heads")`; the stacked layers add a leading
        "layers". sharding.py maps the names to mesh axes.
  kind  one of KINDS. The optimizer decays matrices, embeddings and prefixes, not norm gains or
        biases; the scaling law's N counts everything but the embeddings (and the LM head).
The variable type says which parameters exist only for P > 1 (`ParScaleParam`: the prefixes and the
aggregator), so training only them (PEFT) or swapping them (dynamic P) is a filter, not a list.

Everything that needs to know about parameters (shardings, weight decay, counts, the PEFT split, the
Hugging Face table) reads `model.param_info(cfg)`: a `ParamInfo` for every parameter path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import nnx

KINDS = ("matrix", "embedding", "norm", "bias", "prefix")
DECAYED = frozenset({"matrix", "embedding", "prefix"})


class ParScaleParam(nnx.Param):
    """A parameter that exists only for P > 1: the prefixes and the aggregator."""


def declare(axes: tuple[str, ...], kind: str) -> dict[str, Any]:
    """The metadata a parameter is created with: `nnx.Param(value, **declare(axes, kind))`."""
    if kind not in KINDS:
        raise ValueError(f"unknown parameter kind '{kind}' (one of {KINDS})")
    return {"axes": tuple(axes), "kind": kind}


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter as declared: its shape, logical axes, kind, and whether it is a ParScaleParam."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    kind: str
    parscale: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def describe(variable: nnx.Variable) -> ParamInfo:
    metadata = variable.get_metadata()
    if "axes" not in metadata or "kind" not in metadata:
        raise ValueError(f"a parameter of shape {variable.shape} was created without declare(axes, kind)")
    if len(metadata["axes"]) != len(variable.shape):
        raise ValueError(f"a parameter of shape {variable.shape} declares axes {metadata['axes']}")
    return ParamInfo(tuple(variable.shape), metadata["axes"], metadata["kind"], isinstance(variable, ParScaleParam))


def split_parscale(tree: dict, info: dict) -> tuple[dict, dict]:
    """(ParScale part, backbone part) of any tree shaped like the parameters (or part of them)."""
    flat = nnx.traversals.flatten_mapping(tree)
    flat_info = nnx.traversals.flatten_mapping(info)
    parscale = {path: x for path, x in flat.items() if flat_info[path].parscale}
    backbone = {path: x for path, x in flat.items() if not flat_info[path].parscale}
    return nnx.traversals.unflatten_mapping(parscale), nnx.traversals.unflatten_mapping(backbone)


def merge_parts(*parts: dict) -> dict:
    """One tree from disjoint parts (the inverse of `split_parscale`)."""
    flat = {}
    for part in parts:
        flat.update(nnx.traversals.flatten_mapping(part))
    return nnx.traversals.unflatten_mapping(flat)
