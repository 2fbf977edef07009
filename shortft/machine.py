"""What a figure ran on: the host's CPU, the device and the libraries.

Recorded with every training run (MLflow tags `shortft.host_cpu`, `shortft.device`,
`shortft.libraries`) and every `shortft bench` (its JSON): a CPU step, and a host-bound GPU step, runs
at the host CPU's speed, which has varied 2.5x between days on one machine here, and only torch is
pinned, so a figure without these cannot be told from a code change.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

LIBRARIES = ("torch", "diffusers", "peft", "transformers", "ray", "mlflow")
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
    """'torch 2.13.0, diffusers 0.36.0, ...' from the installed distributions (nothing imported)."""
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def run_tags(device=None) -> dict[str, str]:
    """The three tags; without a device (no models at hand) the device's is left out."""
    tags = dict(zip(TAGS, (host_cpu(), device_name(device) if device is not None else None, library_versions())))
    return {k: v for k, v in tags.items() if v is not None}
