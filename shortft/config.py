"""Run configuration, as pure data: dataclasses loaded from YAML, `a.b=c` overrides, type and range checks.

Every field has a default and a one-line help (the `help` metadata); the dataclasses are the single
source of truth for the YAML files, the command line and the docs. Errors raise `ConfigError` with one
line that names the bad key and what is allowed; the CLI prints it without a traceback.

This module imports no other part of the package. Checks that need a registry or the disk (reward
names, model paths, shortcut files, prompt files) live next to what they check and run together in
`shortft.checks.check(cfg)`.

Over 300 lines: the dataclasses with a help line per field are half of it, and the loader and the
validator read those same fields; splitting them would spread one schema over three files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ALIGNPROP_CUTS = ("per_step", "contiguous")
METHODS = ("shortft", "full", "draft", "draft_lv", "alignprop", "refl", "drtune")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
INTERIOR_ADAPTERS = ("none", "segment")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
# The parts of a config beyond the base model that a command may read, and so check and fetch first. A
# run's config names the files of the machine it trained on; `eval` and `sample` read fewer of them (the
# original sampler calls no shortcut, `sample` scores nothing), so a machine that only samples needs none
# of the others: not the reward models, not the training prompts.
PARTS = ("rewards", "shortcut", "prompts", "eval_prompts")
READS = {"eval": ("rewards", "eval_prompts"), "sample": ()}


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line that names the key and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that `1e-3` is a number, as in YAML 1.2 and JSON: PyYAML's YAML 1.1
    floats need a dot (`1.0e-3`), so `train.lr=1e-3` was the string '1e-3'."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """A key written twice in one mapping is an error, not the last one silently kept: a second
        `train:` block dropped the first's settings without a word. Checked on each mapping as written,
        the first time PyYAML flattens it (a `<<:` merge adds keys to the merged node itself, which its own
        may still override, as YAML means them to)."""
        checked = self.__dict__.setdefault("_checked_nodes", set())
        if id(node) not in checked:
            checked.add(id(node))
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, Hashable):
                    continue  # PyYAML's own error names it
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice, first on line {first[key] + 1}: keep one",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line
        super().flatten_mapping(node)


# Dates are text: a hub tag or a name like 2024-01-05 was refused as "expected a string" (a datetime.date),
# and 2020-02-30 ended in a traceback; no setting is a date.
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",  # tried after PyYAML's own: only what they leave
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text (a config, a space, an override's value) as every reader of the package does. What
    PyYAML reads but cannot make a value of (`0x_`, `!!int abc`) or a value inside itself (an alias in its
    own anchor) is a yaml.YAMLError too: they were a ValueError or RecursionError traceback."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader: plain data, no Python objects
    except (ValueError, TypeError) as e:
        raise yaml.YAMLError(f"a value YAML cannot read ({e})") from None
    _check_acyclic(data, set(), set())
    return data


def _check_acyclic(value: Any, inside: set, done: set) -> None:
    """No container inside itself; each one walked once (aliases repeated in aliases multiplied the paths)."""
    if not isinstance(value, (dict, list)) or id(value) in done:
        return
    if id(value) in inside:
        raise yaml.YAMLError("a value that contains itself (an alias *x inside its own anchor &x)")
    inside.add(id(value))
    for item in value.values() if isinstance(value, dict) else value:
        _check_acyclic(item, inside, done)
    inside.discard(id(value))
    done.add(id(value))


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a default (lists/dicts copied per instance) and its one-line help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    pretrained: str = setting("builtin:tiny", "diffusers pipeline: hub id (org/name), local dir, or builtin:<name>")
    revision: str | None = setting(None, "hub revision (branch, tag or commit) of model.pretrained (null = main)")
    variant: str | None = setting(None, "weights variant of model.pretrained, e.g. fp16 (*.fp16.safetensors)")
    resolution: int | None = setting(None, "image side in pixels, a multiple of the VAE factor (null = the model's own)")
    timestep_spacing: str | None = setting(None, "leading, linspace or trailing (null = the model scheduler's own)")
    shortcut: str = setting("none", "ShortFT's frozen few-step model (the baselines never load it): none (base "
                            "model, one DDIM jump), lora:<path>, unet:<path>")
    shortcut_weight_name: str | None = setting(None, "the file inside a lora: or unet: shortcut's hub repo or folder")
    shortcut_revision: str | None = setting(None, "hub revision (branch, tag or commit) of model.shortcut (null = main)")
    shortcut_scale: float = setting(1.0, "LoRA scale of a lora: shortcut")
    shortcut_guidance_scale: float | None = setting(
        None, "guidance for shortcut jumps (null = 1.0, none, for lora:/unet: shortcuts; chain.guidance_scale for none "
              "and for a LoRA file named -CFG-)")
    dtype: str = setting("float32", "dtype of the frozen weights: float32, bfloat16 or float16 (LoRA stays fp32)")
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    gradient_checkpointing: bool = setting(False, "the UNet's own gradient checkpointing (diffusers), inside every call")
    vae_checkpointing: bool = setting(False, "recompute the VAE decode in backward (less memory)")
    vae_batch_size: int = setting(0, "images per VAE decode (0 = the whole batch at once)")
    tf32: bool = setting(True, "TF32 matmuls and convolutions on CUDA (Ampere and later)")
    compile: bool = setting(False, "torch.compile the UNet and a unet: shortcut (first steps slower, later ones faster)")
    compile_backend: str = setting("inductor", "torch.compile backend; inductor needs a GPU here (docs/models.md)")


@dataclass
class ChainConfig:
    method: str = setting("shortft", "one of " + ", ".join(METHODS))
    steps: int = setting(50, "N: original DDIM steps of the sampler")
    segments: int = setting(4, "k: shortcut segments of the ShortFT chain (the baselines have none)")
    truncate_at: float = setting(0.0, "fraction of the N steps run without gradient first (0 = end to end)")
    guidance_scale: float = setting(7.5, "classifier-free guidance scale (<= 1 turns guidance off)")
    checkpointing: bool = setting(False, "recompute each UNet call in backward (less memory; 1.06-1.24x the time on the "
                                  "toy CPU, BENCHMARKS.md)")
    last_k: int = setting(1, "draft: steps at the end of the chain that carry gradient")
    lv_copies: int = setting(2, "draft_lv: extra re-noised copies of the last step")
    alignprop_range: list = setting([0.0, 1.0], "alignprop: fraction range the random gradient cut is drawn from")
    alignprop_cut: str = setting("per_step", "alignprop: per_step (its authors' code: a fresh cut drawn at each "
                                 "step, which trains if the cut is at or below its index) or contiguous (one cut)")
    refl_window: list = setting([0.75, 1.0], "refl: fraction window of the step that carries gradient")
    refl_guidance: float | None = setting(1.0, "refl: guidance of its training chain (ImageReward's ReFL trains "
                                          "unguided; null = chain.guidance_scale); evaluation keeps the guided one")
    refl_margin: float | None = setting(None, "refl: loss relu(margin - reward) as ImageReward's ReFL (margin 2 "
                                        "on its score); null = -reward like every method")
    drtune_train_steps: int = setting(5, "drtune: K, the most evenly spaced steps that carry gradient")
    drtune_stop_range: list = setting([0.6, 1.0], "drtune: the early stop, drawn per iteration from this range "
                                      "(fractions of the chain); that step's predicted x0 is scored; [1, 1] = off")
    interior_adapters: str = setting("none", "shortft: LoRAs on the steps the short chain skips (the N-step sampler, "
                                      "and a progressive stage's run-up): none or segment")


@dataclass
class LoraConfig:
    rank: int = setting(8, "LoRA rank")
    alpha: float | None = setting(None, "LoRA alpha (null = rank, i.e. scale 1)")
    timestep_aware: bool = setting(True, "one LoRA per segment, stacked; off = one shared LoRA")
    targets: list = setting(["to_q", "to_k", "to_v", "to_out.0"], "UNet module names the LoRA wraps")


@dataclass
class TrainConfig:
    steps: int = setting(100, "optimizer steps")
    batch_size: int = setting(2, "prompts per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(1e-3, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    progressive: bool = setting(True, "shortft: k stages; stage s trains LoRA_s..k")
    stage_segment_grad: bool = setting(True, "progressive: stage s runs segment s itself with gradient")
    grad_clip: float = setting(1.0, "max gradient norm (0 = no clipping)")
    seed: int = setting(0, "seed of prompts, noise and random cuts")
    max_bad_steps: int = setting(5, "stop after this many non-finite losses/grads in a row (an fp16 loss-scale overflow is not one)")
    time_budget_s: float | None = setting(None, "stop once the training steps took this many seconds in all "
                                          "(evaluation excluded); train.steps stays the cap")
    call_budget: int | None = setting(None, "stop once the steps made this many network calls in all (with "
                                      "gradient and without); train.steps stays the cap")
    checkpoint_every: int = setting(50, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = setting(2, "checkpoints kept on disk")
    log_every: int = setting(1, "steps between progress lines")
    mixed_precision: str = setting("auto", "autocast: auto (bf16 on cuda, off on cpu), no, bf16, fp16")
    output_dir: str = setting("runs/{name}", "where checkpoints, LoRA, metrics and samples go")


@dataclass
class RewardConfig:
    weights: dict = setting({"symmetry": 1.0}, "training reward = sum of weight * term (a weight of 0 leaves the term out)")
    options: dict = setting({}, "per-term settings, e.g. {toy_alignment: {path: ...}}")
    modules: list = setting([], "your modules that register reward terms (@register): .py files or importable "
                                "names, imported in every process (Ray workers, sweep trials) (docs/rewards.md)")

    def trained(self) -> dict:
        """The terms the run trains on: those of non-zero weight. A 0 stays in the config (a sweep's trial that
        drew it logs it as searched) but its term is neither loaded nor computed."""
        return {name: weight for name, weight in self.weights.items() if weight != 0}


@dataclass
class EvalConfig:
    every: int = setting(0, "steps between evaluations (0 = only at the end)")
    objective: str = setting("symmetry", "fixed reward term reported as the evaluation objective")
    terms: list = setting([], "extra reward terms to report besides the training ones")
    samples_per_prompt: int = setting(1, "samples per held-out prompt (fixed seeds)")
    seed: int = setting(1234, "seed of the evaluation noise")
    batch_size: int = setting(8, "samples per sampler call")


@dataclass
class DataConfig:
    prompts: Any = setting([], "training prompts: a list, or a .txt/.jsonl/.csv/.parquet file or hf://datasets/... (docs/models.md#prompts)")
    eval_prompts: Any = setting([], "held-out prompts: a list or a file, as data.prompts")
    prompt_column: str = setting("prompt", "the column holding the prompts in a .jsonl/.csv/.parquet file")


@dataclass
class Config:
    name: str = setting("run", "run name")
    model: ModelConfig = field(default_factory=ModelConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name)).expanduser()  # `~/runs` as a shell gives it


# ---------------------------------------------------------------------------------------------
# Loading


def builtin_names(package: str = "shortft.configs") -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def builtin_configs() -> list[str]:
    return builtin_names("shortft.configs")


def project_copy_hint(path: str) -> str:
    """`; did you mean shortft/<path> ...?` where a relative path is missing here but is in the project's
    copy: `ray submit` runs the script in the head's home folder, where the cluster files put the project."""
    if Path(path).is_absolute() or not (Path.home() / "shortft" / path).is_file():
        return ""
    return f"; did you mean {Path('shortft') / path} (the project's copy)?"


def read_mapping(name_or_path: str, package: str = "shortft.configs", flag: str = "--config",
                 shape: str = "a mapping of sections") -> dict:
    """A built-in YAML of `package` by name, or a YAML file; its top level must be a mapping."""
    path = Path(name_or_path)
    if not path.suffix and name_or_path in builtin_names(package):
        text = resources.files(package).joinpath(f"{name_or_path}.yaml").read_text()
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{flag} {name_or_path!r}: not a UTF-8 text file (byte {e.start + 1}); give a YAML "
                              "file saved as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{flag} {name_or_path!r}: not readable ({e.strerror or e})") from None
    elif path.is_dir():
        raise ConfigError(f"{flag} {name_or_path!r}: a folder; give a YAML file or a built-in name (built-in: "
                          f"{', '.join(builtin_names(package))})")
    else:
        raise ConfigError(f"{flag} {name_or_path!r}: no such file or built-in (built-in: "
                          f"{', '.join(builtin_names(package))}){project_copy_hint(name_or_path)}")
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where: a YAML error's first line names no place
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        # the problem too: PyYAML's first line is its context alone ("while scanning for the next token")
        what = "; ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e).splitlines()[0]
        raise ConfigError(f"{flag} {name_or_path!r}: not valid YAML ({what}{at})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {name_or_path!r}: top level must be {shape}")
    return data


def check_device_name(flag: str, name: str) -> None:
    """auto, cpu, cuda or cuda:N; anything else is a ConfigError naming `flag`."""
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"{flag}={name!r}: not one of auto, cpu, cuda, cuda:N (N = 0, 1, ...)")


class _IntText(int):
    """A number read from a command line, with the text it was read from (`text`)."""


class _FloatText(float):
    """A number read from a command line, with the text it was read from (`text`)."""


def parse_overrides(items: list[str], keep_text: bool = True) -> dict:
    """`["chain.steps=20", "reward.weights.symmetry=0.5"]` -> nested dict; values parsed as YAML. A number
    whose text is not how Python writes it keeps that text for a string key (`keep_text`)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. chain.steps=20")
        try:
            parsed = load_yaml(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if keep_text and type(parsed) in (int, float) and str(parsed) != value.strip():  # 0123456 (octal), 12e4567, 1_000
            parsed = (_IntText if type(parsed) is int else _FloatText)(parsed)
            parsed.text = value.strip()  # what a string key (a revision, a name) was given
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = parsed
    return out


def replaced(items: list[str]) -> list[str]:
    """A note for each `key=value` override that a later one replaces (the same key again, or its section:
    `reward.weights.symmetry=1 ... reward.weights={pickscore: 1}`): the later one is used, as a command
    line run again with a value added at its end means, but a key given twice by mistake was lost unsaid."""
    notes, given = [], {}  # dotted key -> the item that set it
    for item in items:
        key = item.partition("=")[0].strip()
        for other in [k for k in given if k == key or k.startswith(f"{key}.")]:
            notes.append(f"{given.pop(other)} is replaced by the later {item}")
        given[key] = item
    return notes


def nested(overrides: dict) -> dict:
    """A dict of overrides with dotted keys (`{"chain.segments": 4}`: a space's, `trainable_for(fixed=...)`) as
    the nested dict a config is; nested ones as they are (merged, not changed in place)."""
    out: dict = {}
    for key, value in overrides.items():
        for part in reversed(str(key).split(".")[1:]):
            value = {part: value}
        out = merge(out, {str(key).split(".")[0]: value})
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Keys whose value may be a local path (`reward.options.<name>.<option>` for the options below).
PATH_KEYS = ("model.pretrained", "model.shortcut", "data.prompts", "data.eval_prompts")
REWARD_PATH_OPTIONS = ("path", "processor", "clip", "arch")


def _path_key(key: str) -> bool:
    return key in PATH_KEYS or (key.startswith("reward.options.") and key.count(".") == 3
                                and key.rsplit(".", 1)[1] in REWARD_PATH_OPTIONS)


def _pinned(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind, sep, rest = value.partition(":") if value.startswith(("lora:", "unet:")) else ("", "", value)
    if not rest or rest.startswith(("builtin:", "/", "~")) or "://" in rest:
        return value
    probe = Path(rest).parent if "{" in Path(rest).name else Path(rest)  # a template: lora:dir/k{segments}
    if str(probe) in ("", ".") or not probe.exists():
        return value  # a hub id, or nothing here: the checks say so
    return f"{kind}{sep}{Path(rest).resolve()}"


def pin_paths(data: dict, prefix: str = "") -> dict:
    """`data` (a config mapping, nested or with dotted keys) with every local path that is relative and
    exists from the working directory made absolute. Ray runs trials and workers in other folders (a
    trial's own, a worker's session folder): a relative `data.prompts: prompts.txt` that the driver found
    failed in every trial."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key == "reward.modules" and isinstance(v, list):  # its .py files; a name is imported as it is
            out[k] = [_pinned(m) if isinstance(m, str) and m.endswith(".py") else m for m in v]
            continue
        out[k] = pin_paths(v, f"{key}.") if isinstance(v, dict) else (_pinned(v) if _path_key(key) else v)
    return out


def read_config(config: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Built-in name or YAML path, then overrides (`a.b=c` strings or a dict, nested or dotted); type and range
    checked (`shortft.load_config` also runs the registry and disk checks). Relative local paths that
    exist from here are made absolute (`pin_paths`)."""
    if config is not None and not isinstance(config, (str, os.PathLike)):  # pathlib's TypeError, a Config too
        raise ConfigError(f"config {config!r:.60}: give a built-in name ({', '.join(builtin_configs())}) or a YAML "
                          "path; a dict goes as the overrides (load_config(None, {...}))")
    if overrides is not None and not isinstance(overrides, (str, dict, list, tuple)):  # "'int' is not iterable"
        raise ConfigError(f"overrides {overrides!r:.60}: give a list of key=value strings or a dict")
    data = read_mapping(str(config)) if config else {}
    if isinstance(overrides, str):  # its letters were read as overrides: "override 't': expected key=value"
        raise ConfigError(f"overrides {overrides!r}: give a list of key=value strings, e.g. [{overrides!r}], or a "
                          "dict")
    if overrides:
        data = merge(data, nested(overrides) if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    cfg = from_dict(Config, pin_paths(data))
    validate(cfg)
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is Any:
        return _plain(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, dict) and len(value) == 1 and None in value.values():  # `lora:` read as YAML
            fix = "e.g. model.shortcut=lora:<path or hub id>" if key == "model.shortcut" else "or quote the value"
            raise ConfigError(f"{key}='{next(iter(value))}:': nothing after the colon; give the whole value, {fix}")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return getattr(value, "text", None) or str(value)  # model.revision=0123456 is that commit, not 42798
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. [a, b]")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return _plain(value)  # `reward.weights.symmetry=1e0` merged into it
    return value


def _plain(value: Any) -> Any:
    """`value` without the text a command line's numbers carry (YAML writes only plain ints and floats)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return {_IntText: int, _FloatText: float}.get(type(value), lambda v: v)(value)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {full!r}: allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: is a section; set its keys, e.g. {full}.{dataclasses.fields(tp)[0].name}=...")
            kwargs[key] = from_dict(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: for logging params."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def alpha_as_used(settings: dict) -> dict:
    """Flat settings with an unset `lora.alpha` as the LoRAs are scaled by it (the rank), so that alphas
    compare (a LoRA file's, a sweep trial's sampled one)."""
    if settings.get("lora.alpha") is None and settings.get("lora.rank") is not None:
        return {**settings, "lora.alpha": float(settings["lora.rank"])}
    return settings


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field: for docs and `shortft config --help`."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))

    walk(Config, "")
    return rows


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked without loading a model.


def _one_of(key: str, value: Any, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: not one of {', '.join(allowed)}")


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value!r}: must be a finite number {'>= 0' if zero_ok else '> 0'}")


def _fraction_range(key: str, value: list, low_open: bool = False) -> None:
    """[low, high] fractions of the chain: 0 <= low < high <= 1, or 0 < low <= high <= 1 with `low_open`
    (a range of steps counted from 1, where one fixed step is a range too)."""
    numbers = len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if low_open and not (numbers and 0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"{key}={value!r}: expected [low, high] with 0 < low <= high <= 1")
    if not low_open and not (numbers and 0 <= value[0] < value[1] <= 1):
        raise ConfigError(f"{key}={value!r}: expected [low, high] with 0 <= low < high <= 1")


NAME_BYTES = 200  # a folder's name is at most 255 bytes, an MLflow run's 250, less the suffixes they add
MAX_RESOLUTION = 16384  # 8x SDXL's side; a 2048x2048 latent


def check_name(flag: str, name: str, room: int = 0) -> None:
    """A run or sweep name is one folder (`runs/{name}`, the storage path's `<name>/`): `../x` wrote elsewhere.
    `room`: the bytes names made from it add (a sweep's trials: `<name>-t001`)."""
    if len(name.encode()) > NAME_BYTES - room:  # an OSError traceback where it named a folder
        raise ConfigError(f"{flag}={name[:40]}...: {len(name.encode())} bytes; a name is at most {NAME_BYTES - room} "
                          + (f"(a run's {NAME_BYTES}, less the {room} its trials' names add)" if room else
                             "(it names folders and an MLflow run)"))
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{flag}={name!r}: a name is one folder's name: not empty, no / or \\, not . or .. "
                          "(e.g. sd15-pickscore; to group runs, train.output_dir=runs/<group>/{name})")


def validate(cfg: Config) -> None:
    """Types and ranges: everything that can be checked from the values alone."""
    chain, lora, train, model = cfg.chain, cfg.lora, cfg.train, cfg.model
    check_name("name", cfg.name)
    if not str(train.output_dir).strip():  # '' wrote the whole run into the working directory
        raise ConfigError("train.output_dir='': give a folder, e.g. runs/{name} (the default)")
    try:
        train.output_dir.format(name=cfg.name)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ConfigError(f"train.output_dir={train.output_dir!r}: its one placeholder is {{name}} (the run's name), "
                          "e.g. runs/<group>/{name}; write a brace itself as {{ or }}") from None
    _one_of("chain.method", chain.method, METHODS)
    for key, value in (("chain.steps", chain.steps), ("chain.segments", chain.segments), ("lora.rank", lora.rank),
                       ("train.steps", train.steps), ("train.batch_size", train.batch_size),
                       ("train.grad_accum", train.grad_accum), ("chain.last_k", chain.last_k),
                       ("chain.lv_copies", chain.lv_copies), ("chain.drtune_train_steps", chain.drtune_train_steps),
                       ("train.max_bad_steps", train.max_bad_steps), ("train.keep_checkpoints", train.keep_checkpoints),
                       ("train.log_every", train.log_every), ("eval.samples_per_prompt", cfg.eval.samples_per_prompt),
                       ("eval.batch_size", cfg.eval.batch_size)):
        if value <= 0:
            raise ConfigError(f"{key}={value}: must be a positive integer")
    for key, value in (("train.seed", train.seed), ("eval.seed", cfg.eval.seed)):
        if not 0 <= value < 2**32:  # numpy's seeds are >= 0; torch's overflow at 2**64
            raise ConfigError(f"{key}={value}: a seed is an integer in [0, 2**32)")
    if chain.method == "shortft" and chain.segments > chain.steps:  # the baselines' N steps have no segments
        raise ConfigError(f"chain.segments={chain.segments}: must be <= chain.steps={chain.steps} (each segment needs a step)")
    if chain.last_k > chain.steps:
        raise ConfigError(f"chain.last_k={chain.last_k}: must be <= chain.steps={chain.steps}")
    if not (math.isfinite(chain.truncate_at) and 0 <= chain.truncate_at < 1):
        raise ConfigError(f"chain.truncate_at={chain.truncate_at}: must be in [0, 1) (0 = gradient end to end)")
    if chain.method == "refl" and chain.truncate_at > 0:  # it trains one drawn step; a cut would only drop draws
        raise ConfigError(f"chain.truncate_at={chain.truncate_at}: refl has no truncation (its one trained step is drawn "
                          f"from chain.refl_window={chain.refl_window}); move the window instead")
    _fraction_range("chain.drtune_stop_range", chain.drtune_stop_range, low_open=True)
    _fraction_range("chain.alignprop_range", chain.alignprop_range)
    _one_of("chain.alignprop_cut", chain.alignprop_cut, ALIGNPROP_CUTS)
    _fraction_range("chain.refl_window", chain.refl_window)
    for key, value in (("chain.refl_guidance", chain.refl_guidance), ("chain.refl_margin", chain.refl_margin),
                       ("model.shortcut_guidance_scale", model.shortcut_guidance_scale)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number or null")
    _one_of("chain.interior_adapters", chain.interior_adapters, INTERIOR_ADAPTERS)
    if not math.isfinite(chain.guidance_scale):
        raise ConfigError(f"chain.guidance_scale={chain.guidance_scale}: must be a finite number")
    if lora.alpha is not None:
        _positive("lora.alpha", lora.alpha)
    if not lora.targets or not all(isinstance(x, str) for x in lora.targets):
        raise ConfigError(f"lora.targets={lora.targets!r}: expected a non-empty list of module names, e.g. [to_q, to_v]")
    _positive("train.lr", train.lr)
    if train.time_budget_s is not None:
        _positive("train.time_budget_s", train.time_budget_s)
    if train.call_budget is not None and (isinstance(train.call_budget, bool) or train.call_budget <= 0):
        raise ConfigError(f"train.call_budget={train.call_budget}: must be a positive integer (or null: no budget)")
    _positive("train.weight_decay", train.weight_decay, zero_ok=True)
    _positive("train.grad_clip", train.grad_clip, zero_ok=True)
    for key, value in (("train.checkpoint_every", train.checkpoint_every), ("eval.every", cfg.eval.every)):
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0 (0 = only at the end)")
    _one_of("train.mixed_precision", train.mixed_precision, MIXED_PRECISION)
    _one_of("model.dtype", model.dtype, ("float32", "bfloat16", "float16"))
    check_device_name("model.device", model.device)
    if model.timestep_spacing is not None:
        _one_of("model.timestep_spacing", model.timestep_spacing, TIMESTEP_SPACINGS)
    if model.resolution is not None and not 0 < model.resolution <= MAX_RESOLUTION:  # 10**12: torch's size overflow
        raise ConfigError(f"model.resolution={model.resolution}: must be a positive number of pixels, at most "
                          f"{MAX_RESOLUTION} (null = the model's own)")
    if model.vae_batch_size < 0:
        raise ConfigError(f"model.vae_batch_size={model.vae_batch_size}: must be >= 0 (0 = the whole batch at once)")
    _positive("model.shortcut_scale", model.shortcut_scale, zero_ok=True)
    kind, _, path = model.shortcut.partition(":")
    if model.shortcut != "none" and (kind not in ("lora", "unet") or not path):
        raise ConfigError(f"model.shortcut={model.shortcut!r}: expected none, lora:<path or hub id>, unet:<path or hub id>")

    if not cfg.reward.weights:
        raise ConfigError("reward.weights: empty; name at least one term, e.g. reward.weights.symmetry=1.0")
    for name, weight in cfg.reward.weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"reward.weights.{name}={weight!r}: must be a finite number (0 leaves the term out)")
    # Overrides merge into the config's own weights, so a 0 is how a term is taken out (sd15 on PickScore
    # alone: reward.weights.hps_v2=0 reward.weights.aesthetic=0): `RewardConfig.trained`.
    if not cfg.reward.trained():
        raise ConfigError("reward.weights: every weight is 0; give at least one term a weight, e.g. "
                          "reward.weights.symmetry=1.0")
    for name, opts in cfg.reward.options.items():
        if not isinstance(opts, dict):
            raise ConfigError(f"reward.options.{name}={opts!r}: expected a mapping, e.g. {{path: ...}}")
    for key in ("prompts", "eval_prompts"):
        value = getattr(cfg.data, key)
        if isinstance(value, str):
            continue  # a file: `shortft.data.check_prompts` looks for it
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            none = value == [] and key == "prompts"  # the defaults' own: a config of one's own that gives none
            raise ConfigError(f"data.{key}: expected a non-empty list of prompts or a text file path" + (
                " (a config needs its prompts: start from a built-in one, e.g. shortft config --config toy > "
                "my.yaml, or name one: --config toy)" if none else ""))
        if not all(p.strip() for p in value):  # a file's blank lines are dropped; a list's would be trained on
            raise ConfigError(f"data.{key}: prompt {[p.strip() for p in value].index('') + 1} is blank; give text")
