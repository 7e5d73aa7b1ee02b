"""`parscale-jax info`: what a run holds, without reading its files: steps done and checkpoints,
growth stages, where it came from, its last logged losses, and how its settings differ from the
shipped default config."""

from __future__ import annotations

import json
from typing import Any

from parscale_jax.checkpoint import complete_steps
from parscale_jax.config import config_differences, load_config, to_dict
from parscale_jax.growth import Schedule, describe
from parscale_jax.model.counting import active_non_embedding_params, non_embedding_params, total_params
from parscale_jax.runs import Run


def _last_logged(run: Run) -> dict[str, Any]:
    """The newest logged value of each of loss, eval_loss, tokens_per_s (and their steps)."""
    path = run.directory / "metrics.jsonl"
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill
            continue
        for key in ("loss", "eval_loss", "tokens_per_s"):
            if key in record:
                last[key] = {"step": record["step"], "value": record[key]}
    return last


def run_info(run: Run) -> dict[str, Any]:
    """What `format_info` shows, as plain data."""
    config, schedule = run.config, Schedule(run.config)
    checkpoints = {folder.name: complete_steps(folder) for folder in sorted(run.directory.glob("checkpoints*"))
                   if folder.is_dir() and not folder.name.endswith(".damaged")}
    damaged = sorted(folder.name for folder in run.directory.glob("checkpoints*.damaged"))
    steps = complete_steps(run.checkpoint_dir)
    done = max(steps, default=0)
    model = schedule.model_at(done)
    default = to_dict(load_config("default"))
    return {
        "run_dir": str(run.directory.absolute()),
        "steps_done": done, "steps": config.train.steps, "complete": done >= config.train.steps,
        "checkpoints": checkpoints, "damaged": damaged,
        "model": describe(model) + _experts(model), "parameters": total_params(model), "non_embedding_parameters":
            non_embedding_params(model), "active_non_embedding_parameters": active_non_embedding_params(model),
        "growth": [{"step": stage.step, "ramp_ends": stage.step + stage.ramp_steps, "model": describe(grown),
                    "begun": done > stage.step}
                   for stage, grown in zip(config.train.growth, schedule.models[1:])],
        "starting_weights": (run.initial_dir / "backbone").exists(),
        "lineage": run.lineage(),
        "last_logged": _last_logged(run),
        "differs_from_default": {key: new for key, (_, new) in config_differences(default, to_dict(config)).items()},
    }


def _experts(model) -> str:
    if model.ffn != "moe":
        return ""
    width = model.moe_intermediate_size or model.intermediate_size
    shared = f", a shared expert of {model.moe_shared_expert_size}" if model.moe_shared_expert_size else ""
    return f"; {model.num_experts} experts of {width}, {model.experts_per_token} per token{shared}"


def _lineage_lines(lineage: dict[str, Any] | None, indent: str = "  ") -> list[str]:
    if lineage is None:
        return [f"{indent}(not recorded)"]
    details = {k: v for k, v in lineage.items() if k not in ("made_from", "parents", "created", "lineage")}
    said = ", ".join(f"{k} {v}" for k, v in details.items())
    lines = [f"{indent}{lineage.get('made_from', '?')}" + (f": {said}" if said else "")
             + (f" ({lineage['created']})" if "created" in lineage else "")]
    for parent in lineage.get("parents", []):
        where = f"{parent.get('kind', '?')} {parent.get('path', '')}" + (
            f" at step {parent['step']}" if "step" in parent else "")
        lines.append(f"{indent}  from {where}")
        if parent.get("lineage"):
            lines += _lineage_lines(parent["lineage"], indent + "    ")
    return lines


def format_info(info: dict[str, Any]) -> str:
    status = "complete" if info["complete"] else "in progress"
    lines = [f"run          {info['run_dir']}",
             f"steps        {info['steps_done']} of {info['steps']} ({status})",
             f"model        {info['model']}: {info['parameters']:,} parameters "
             f"({info['non_embedding_parameters']:,} non-embedding"
             + (f", {info['active_non_embedding_parameters']:,} active per token)"
                if info["active_non_embedding_parameters"] != info["non_embedding_parameters"] else ")")]
    for folder, steps in info["checkpoints"].items() or {"checkpoints": []}.items():
        lines.append(f"{folder:<12} {', '.join(map(str, steps)) or 'none yet'}"
                     + (" (and starting weights as step 0)" if info["starting_weights"] else ""))
    if info["damaged"]:
        lines.append(f"set aside    {', '.join(info['damaged'])} (damaged checkpoints, kept)")
    for stage in info["growth"]:
        lines.append(f"growth       at step {stage['step']} (ramp to {stage['ramp_ends']}): {stage['model']}"
                     + ("" if stage["begun"] else " (to come)"))
    for key, logged in info["last_logged"].items():
        lines.append(f"{key:<12} {logged['value']:.4f} at step {logged['step']}" if key != "tokens_per_s" else
                     f"{key:<12} {logged['value']:,.0f} at step {logged['step']}")
    lines += ["lineage", *_lineage_lines(info["lineage"])]
    differ = info["differs_from_default"]
    lines.append("settings     " + ("as the shipped default config" if not differ else "differing from the shipped "
                                    "default config:"))
    lines += [f"  {key} = {value!r}" for key, value in differ.items()]
    return "\n".join(lines)
