"""The training plan of a config, in one place: adapters, stages, which adapters train in each stage,
the network calls of each stage, and the resolved shortcut. The loop, the evaluation, the CLI's
`plan` command, the benchmark and the saved `shortft_lora.json` all read it from `training_plan(cfg)`.

A call plan is a plain list of `Call`s. The original N-step sampler is one call per timestep. The
ShortFT chain (docs/method.md) splits the N steps into k segments; segment 1 (the head) runs its original
steps with LoRA_1; every later segment j runs one frozen-shortcut jump across its interior and then ONE
original step at its last timestep with LoRA_1..j. For N=50, k=4 on SD's leading timesteps:

    head 981..761 (12 steps), jump 741->501, step 501, jump 481->261, step 261, jump 241->1, step 1

i.e. 12 + 2*3 = 18 calls instead of 50.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from shortft import builtin
from shortft.config import ChainConfig, Config, ConfigError, ModelConfig

FINAL = -1  # t_next of the last step: the clean sample


@dataclass(frozen=True)
class Call:
    index: int  # position of the starting timestep in the N-step schedule
    t: int
    t_next: int  # where the call lands; FINAL for the clean sample
    shortcut: bool  # True: the frozen few-step model jumps t -> t_next
    adapters: tuple[str, ...]  # LoRAs active for this call (empty for the shortcut)
    segment: int  # 1-based

    def describe(self) -> str:
        to = "x0" if self.t_next == FINAL else str(self.t_next)
        what = "shortcut jump" if self.shortcut else "original step"
        loras = "+".join(self.adapters) if self.adapters else "no LoRA"
        return f"seg {self.segment}  {what:13s} {self.t:4d} -> {to:>4s}  [{loras}]"


def segment_bounds(steps: int, segments: int) -> list[int]:
    """Start indices of the k segments plus N: floor(N*j/k), e.g. [0, 12, 25, 37, 50] for 50/4."""
    return [steps * j // segments for j in range(segments + 1)]


def segment_of(index: int, bounds: Sequence[int]) -> int:
    return max(j for j in range(1, len(bounds)) if bounds[j - 1] <= index)


class Schedule(list):
    """The N timesteps of the sampler, high to low, and the DDIM stride T // N (T: training timesteps).

    diffusers' DDIMScheduler steps from t to t - T // N whatever the spacing: the next timestep for
    `leading` spacing, but not always for `linspace` / `trailing` (e.g. linspace N=10: 999 -> 899, then
    the next call is at 888). The chain lands where the pipeline does, so that the full chain IS the
    pipeline's sampler; below 0 is the clean sample (FINAL)."""

    def __init__(self, timesteps: Sequence[int], stride: int | None = None):
        super().__init__(int(t) for t in timesteps)
        self.stride = stride


def schedule(scheduler, steps: int) -> Schedule:
    """The N-step DDIM schedule of a diffusers scheduler (its own `timestep_spacing`)."""
    if steps > scheduler.config.num_train_timesteps:  # diffusers' own error is a ValueError traceback
        raise ConfigError(f"chain.steps={steps}: at most {scheduler.config.num_train_timesteps}, this model's "
                          "training timesteps")
    scheduler.set_timesteps(steps)
    return Schedule(scheduler.timesteps, scheduler.config.num_train_timesteps // steps)


def _next_t(timesteps: Sequence[int], i: int) -> int:
    """Where an original step from timesteps[i] lands (a plain list: the next timestep)."""
    stride = getattr(timesteps, "stride", None)
    if stride is None:
        return int(timesteps[i + 1]) if i + 1 < len(timesteps) else FINAL
    t = int(timesteps[i]) - stride
    return t if t >= 0 else FINAL


def stacked(names: Sequence[str]) -> Callable[[int], tuple[str, ...]]:
    """Timestep-aware LoRAs: segment j uses LoRA_1..j; a single name is shared by every segment."""
    if not names:
        return lambda segment: ()
    if len(names) == 1:
        return lambda segment: (names[0],)
    return lambda segment: tuple(names[:segment])


def sampler_plan(
    timesteps: Sequence[int],
    segments: int,
    adapters_for: Callable[[int], tuple[str, ...]],
    interior: str = "segment",
) -> list[Call]:
    """The original N-step sampler with the learned LoRAs (inference, evaluation, progressive warm-up).

    interior="none" runs the steps a ShortFT chain skips (the interiors of segments 2..k) without LoRA.
    """
    bounds = segment_bounds(len(timesteps), segments)
    calls = []
    for i, t in enumerate(timesteps):
        seg = segment_of(i, bounds)
        skipped = seg > 1 and i < bounds[seg] - 1
        adapters = () if interior == "none" and skipped else adapters_for(seg)
        calls.append(Call(i, int(t), _next_t(timesteps, i), False, adapters, seg))
    return calls


def shortft_plan(
    timesteps: Sequence[int],
    segments: int,
    adapters_for: Callable[[int], tuple[str, ...]],
    stage: int = 1,
    interior: str = "segment",
) -> list[Call]:
    """The ShortFT training chain for progressive stage `stage` (1 = the whole short chain).

    Segments before `stage` run the original steps (the caller runs them without gradient), so that
    the LoRAs being trained see inputs from the true trajectory.
    """
    bounds = segment_bounds(len(timesteps), segments)
    calls = [c for c in sampler_plan(timesteps, segments, adapters_for, interior) if c.segment < stage]
    for seg in range(stage, segments + 1):
        start, end = bounds[seg - 1], bounds[seg]
        last = end - 1
        if seg == 1:
            calls += [Call(i, int(timesteps[i]), _next_t(timesteps, i), False, adapters_for(1), 1) for i in range(end)]
            continue
        if last > start:  # a one-step segment has no interior to jump across
            calls.append(Call(start, int(timesteps[start]), int(timesteps[last]), True, (), seg))
        calls.append(Call(last, int(timesteps[last]), _next_t(timesteps, last), False, adapters_for(seg), seg))
    return calls


def format_plan(calls: Sequence[Call]) -> str:
    lines = [f"{n:3d}  {c.describe()}" for n, c in enumerate(calls, 1)]
    return "\n".join(lines + [f"{len(calls)} network calls"])


# ---------------------------------------------------------------------------------------------
# The plan of a whole run


@dataclass(frozen=True)
class Shortcut:
    """The frozen few-step model: `none` (the base model jumps in one DDIM step), a LoRA on the base
    UNet, or a separate UNet; `path` is a local path or a hub id, with `{segments}` filled in.
    `weight_name`: one file inside a hub repo (`lora:ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors`)."""

    kind: str
    path: str = ""
    weight_name: str | None = None


def resolve_shortcut(model: ModelConfig, segments: int) -> Shortcut:
    if model.shortcut == "none":
        return Shortcut("none")
    kind, _, path = model.shortcut.partition(":")
    path = builtin.resolve_path(path, segments)
    parts = path.split("/")
    in_hub_repo = (len(parts) > 2 and path.endswith(".safetensors") and not path.startswith(("/", ".", "~"))
                   and not Path(path).exists())
    if model.shortcut_weight_name:
        return Shortcut(kind, path, model.shortcut_weight_name)
    if in_hub_repo:  # org/repo/<file inside the repo>
        return Shortcut(kind, "/".join(parts[:2]), "/".join(parts[2:]))
    return Shortcut(kind, path)


def shortcut_of(model: ModelConfig, chain) -> Shortcut:
    """The shortcut a chain jumps with: ShortFT's alone. The baselines run the N-step sampler and never call
    it: it was loaded all the same (an SDXL `unet:` shortcut is another 5 GB on the card, and a download),
    and a toy `full` run of chain.segments=3 was refused for the shortcut-k3 no method there uses."""
    return resolve_shortcut(model, chain.segments) if chain.method == "shortft" else Shortcut("none")


def check_shortcut(cfg: Config) -> None:
    """A shortcut given as a local path (or a built-in file) must exist; hub ids are checked on load."""
    shortcut = shortcut_of(cfg.model, cfg.chain)
    if shortcut.kind == "none":
        return
    given = cfg.model.shortcut.partition(":")[2]
    folder = Path(shortcut.path).expanduser()
    if (given.startswith("builtin:") or builtin.looks_like_path(shortcut.path)) and not folder.exists():
        hint = " (no shortcut for this chain.segments?)" if "{segments}" in given else ""
        raise ConfigError(f"model.shortcut={cfg.model.shortcut!r}: {shortcut.path} does not exist{hint}")
    if shortcut.weight_name:  # a file inside a local folder here; inside a hub repo, `hub.check_sources`
        if folder.is_dir() and not (folder / shortcut.weight_name).is_file():
            raise ConfigError(f"model.shortcut={cfg.model.shortcut!r}: {shortcut.path} has no file {shortcut.weight_name}")
        return
    if shortcut.kind == "lora" and folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise ConfigError(f"model.shortcut={cfg.model.shortcut!r}: {shortcut.path} holds no .safetensors file; give "
                          "the folder of a LoRA, or lora:<folder>/<file>")
    if shortcut.kind == "unet" and folder.is_dir():  # else found only once the base model had loaded
        check_unet_folder(f"model.shortcut={cfg.model.shortcut!r}", folder)


def check_unet_folder(flag: str, folder: Path) -> None:
    """A local folder given as a UNet (or a pipeline holding one in unet/) has a UNet's config.json and
    weights; a ConfigError naming what it holds instead."""
    import json

    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    fix = ("give a diffusers UNet folder (config.json, diffusion_pytorch_model*.safetensors), a pipeline folder "
           "with unet/, or unet:<folder>/<file>.safetensors")
    try:
        kind = json.loads((unet / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
    except FileNotFoundError:
        raise ConfigError(f"{flag}: {unet} has no config.json; {fix}") from None
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{flag}: {unet}/config.json is not a JSON object ({e}); {fix}") from None
    if kind != "UNet2DConditionModel":
        raise ConfigError(f"{flag}: {unet} holds {kind} (its config.json), not a UNet; {fix}")
    if not any(next(unet.glob(f"diffusion_pytorch_model*.{ext}"), None) for ext in ("safetensors", "bin")):
        raise ConfigError(f"{flag}: {unet} has no UNet weights (diffusion_pytorch_model*.safetensors); {fix}")


def adapter_names(method: str, timestep_aware: bool, segments: int) -> list[str]:
    """One LoRA per segment for timestep-aware ShortFT; one shared `default` LoRA otherwise."""
    if method == "shortft" and timestep_aware and segments > 1:
        return [f"segment_{j}" for j in range(1, segments + 1)]
    return ["default"]


@dataclass(frozen=True)
class TrainingPlan:
    """Who trains what, when, through which calls. Build it with `training_plan(cfg)`."""

    chain: ChainConfig
    adapters: tuple[str, ...]
    stages: int
    stage_segment_grad: bool
    shortcut: Shortcut

    @property
    def interior(self) -> str:
        """LoRAs on segment interiors at inference: a ShortFT setting (its LoRAs never trained there);
        the baselines train one LoRA on every step, so it is always on for them."""
        return self.chain.interior_adapters if self.chain.method == "shortft" else "segment"

    def trainable(self, stage: int) -> tuple[str, ...]:
        """Progressive ShortFT: stage s trains LoRA_s..k (a shared LoRA trains in every stage)."""
        return self.adapters[stage - 1:] if len(self.adapters) > 1 else self.adapters

    def first_grad_segment(self, stage: int) -> int:
        """Progressive stage s runs the segments before s without gradient (and segment s too, unless
        train.stage_segment_grad). The last stage has no segment after its own, so it always runs its
        own with gradient: else no call would carry any and its LoRA would not train."""
        return stage if self.stage_segment_grad or stage == self.stages else stage + 1

    def calls(self, timesteps: Sequence[int], stage: int = 1) -> list[Call]:
        """The calls a method makes (for ShortFT: the short chain of `stage`; else the N-step sampler)."""
        adapters_for = stacked(self.adapters)
        if self.chain.method == "shortft":
            return shortft_plan(timesteps, self.chain.segments, adapters_for, stage, self.interior)
        return sampler_plan(timesteps, self.chain.segments, adapters_for, self.interior)

    def inference_calls(self, timesteps: Sequence[int]) -> list[Call]:
        """The ORIGINAL N-step sampler with the learned LoRAs (evaluation and inference)."""
        return sampler_plan(timesteps, self.chain.segments, stacked(self.adapters), self.interior)

    def lora_json(self, timesteps: Sequence[int]) -> dict:
        """What `shortft_lora.json` holds: which adapters run at which timestep at inference."""
        return {"method": self.chain.method, "steps": self.chain.steps, "segments": self.chain.segments,
                "interior": self.interior, "timesteps": list(timesteps),
                "step_adapters": [list(c.adapters) for c in self.inference_calls(timesteps)]}


def training_plan(cfg: Config, saved: dict | None = None) -> TrainingPlan:
    """The plan of `cfg`; with `saved` (a `shortft_lora.json`), the adapters and chain of that run."""
    chain = cfg.chain
    if saved is not None:
        chain = replace(chain, method=saved["method"], segments=saved["segments"])
        adapters = tuple(saved["adapters"])
    else:
        if chain.method != "shortft":  # the N-step sampler of a baseline has no segments (its LoRA plan says 1)
            chain = replace(chain, segments=1)
        adapters = tuple(adapter_names(chain.method, cfg.lora.timestep_aware, chain.segments))
    stages = chain.segments if chain.method == "shortft" and cfg.train.progressive else 1
    return TrainingPlan(chain, adapters, stages, cfg.train.stage_segment_grad, shortcut_of(cfg.model, chain))
