"""`shortft_lora.json`: which adapters a run's LoRA folder holds and which run at each timestep at
inference (`lora_save` writes it), read back and checked: a hand-edited or hostile one is one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shortft.config import METHODS, ConfigError
from shortft.safe_load import Unreadable

PLAN_FILE = "shortft_lora.json"

# What a `shortft_lora.json` must hold (`save_loras` writes it; sampling and `enable_timestep_aware` read it).
_PLAN_KEYS = {"method": str, "segments": int, "adapters": list, "timesteps": list, "step_adapters": list}


def _plan_problem(plan: dict) -> str | None:
    """What in a `shortft_lora.json` no run writes (its keys are of the right kinds), None if nothing."""
    steps, segments, names = len(plan["timesteps"]), plan["segments"], plan["adapters"]
    if plan["method"] not in METHODS:
        return f"method {plan['method']!r}: not one of {', '.join(METHODS)}"
    if isinstance(segments, bool) or not 1 <= segments <= max(steps, 1):
        return f"segments {segments!r}: a whole number from 1 to its {steps} timesteps"
    if not names:
        return "adapters []: name at least one"
    bad = next((n for n in names if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", n)), None)
    if bad is not None:
        return f"adapters: {bad!r} is not a folder name beside it"
    calls = plan["step_adapters"]
    if not all(isinstance(call, list) for call in calls):  # a name alone was read as its letters
        return "step_adapters: each step's entry is a list of its adapters"
    stray = next((a for call in calls for a in call if a not in names), None)
    return f"step_adapters: {stray!r} is none of its adapters" if stray is not None else None


def read_lora_plan(lora_dir: str | Path) -> dict:
    """The `shortft_lora.json` of a LoRA folder a run wrote; a ConfigError naming the folder if absent, or
    the file if it is not what a run writes."""
    if not Path(lora_dir).is_dir():
        what = "a file" if Path(lora_dir).exists() else "no such folder"
        raise ConfigError(f"--lora {lora_dir}: {what}; give the lora/ dir a train run wrote")
    plan_file = Path(lora_dir) / PLAN_FILE
    if not plan_file.is_file():
        inside = Path(lora_dir) / "lora"  # a run's or a checkpoint's folder, given for its lora/
        raise ConfigError(f"--lora {lora_dir}: no {PLAN_FILE} there; " + (
            f"give {inside}" if (inside / PLAN_FILE).is_file() else "give the lora/ dir a train run wrote"))
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError) as e:
        raise Unreadable(f"LoRA plan {plan_file}: unreadable ({type(e).__name__}: {str(e)[:100]}); give the "
                         "lora/ dir a train run wrote, whole") from None
    bad = [k for k, kind in _PLAN_KEYS.items() if not isinstance(plan, dict) or not isinstance(plan.get(k), kind)]
    if bad:
        raise Unreadable(f"LoRA plan {plan_file}: {bad[0]!r} missing or of another kind; give the lora/ dir a "
                         "train run wrote, whole")
    problem = _plan_problem(plan)
    if problem:  # hand-edited, or not a run's: a traceback (ZeroDivisionError, peft's KeyError) or another sampler
        raise Unreadable(f"LoRA plan {plan_file}: {problem}; give the lora/ dir a train run wrote, whole")
    for name in plan["adapters"]:  # now, not once the models have loaded
        if not (Path(lora_dir) / str(name) / "pytorch_lora_weights.safetensors").is_file():
            raise Unreadable(f"LoRA {Path(lora_dir) / str(name)}: no pytorch_lora_weights.safetensors there; give "
                             "the lora/ dir a train run wrote, whole")
    return plan
