"""What a figure ran on: the host's CPU, the device and the libraries.

Recorded with every training run (MLflow tags `shortft.host_cpu`, `shortft.device`,
`shortft.libraries`, this package's commit among them) and every `shortft bench` (its JSON): a CPU
step, and a host-bound GPU step, runs at the host CPU's speed, which has varied 2.5x between days on
one machine here, and only torch is pinned, so a figure without these cannot be told from a code change.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("shortft", "torch", "diffusers", "peft", "transformers", "ray", "mlflow")
TAGS = ("shortft.host_cpu", "shortft.device", "shortft.libraries")


def host_cpu() -> str:
    """'AMD EPYC, 2 CPUs': the first model name in /proc/cpuinfo (else what `platform` says) and the count."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def device_name(device) -> str:
    """'cpu', or the CUDA card's name ('NVIDIA H200') for a torch.device of type cuda."""
    if getattr(device, "type", str(device)) != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


def library_versions() -> str:
    """'shortft 0.1.0 (git 83665ce), torch 2.13.0, diffusers 0.36.0, ...' from the installed distributions
    (nothing imported), and this package's commit where it runs from a git checkout: what a metric meant
    can change between commits of one version (`eval/objective_se`: over samples, then over prompts)."""
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}" + (_commit() if name == "shortft" else ""))
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _commit() -> str:
    """' (git <short hash>[, modified])' of the checkout this package runs from, '' where it is none (a wheel,
    a cluster's copy without .git) or git is missing."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode or not (here.parent / ".git").exists():  # a checkout of this project, not one around it
            return ""
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head.stdout.strip()}{', modified' if dirty else ''})"


def run_tags(device=None) -> dict[str, str]:
    """The three tags; without a device (no models at hand) the device's is left out."""
    tags = dict(zip(TAGS, (host_cpu(), device_name(device) if device is not None else None, library_versions())))
    return {k: v for k, v in tags.items() if v is not None}
