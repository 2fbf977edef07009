"""Search spaces: which config keys a sweep searches, over what, and from which base config.

A space is a small YAML file (built-in ones live in `shortft/spaces/`; copy one to edit it):

    base: toy                       # built-in config name or YAML path (--config overrides it)
    fixed:                          # config keys every trial sets
      train.steps: 60
    search:                         # config key -> one distribution
      chain.segments: {choice: [2, 4, 8]}
      chain.truncate_at: {uniform: [0.0, 0.75]}
      lora.rank: {lograndint: [4, 128]}       # integers, both ends included
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    points_to_evaluate:             # tried first, e.g. the paper's defaults
      - {chain.segments: 4, chain.truncate_at: 0.0, lora.rank: 8, train.lr: 1.0e-3}

Everything is checked here, before Ray starts: unknown keys, empty ranges, rewards that do not exist,
values a config would reject. Ray Tune is imported only by `to_tune`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shortft.checks import check, check_types
from shortft.config import (Config, ConfigError, builtin_names, describe, from_dict, merge, nested, pin_paths,
                            read_mapping, validate)

KINDS = ("choice", "uniform", "loguniform", "randint", "lograndint")
PROBED = 256  # an integer range this wide or less is checked value by value
DYNAMIC = ("reward.weights.", "reward.options.")  # keys under these name a reward term
SECTIONS = {"base": (str, "a built-in config name or a YAML path, e.g. base: toy"),
            "fixed": (dict, "a mapping of config keys"), "search": (dict, "a mapping of config keys"),
            "points_to_evaluate": (list, "a list of mappings of searched keys to values")}


@dataclass
class Dimension:
    key: str
    kind: str
    args: list

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.args
        lo, hi = self.args
        return self.takes(value) and lo <= value <= hi

    @property
    def integer(self) -> bool:
        return self.kind.endswith("randint")

    def takes(self, value: Any) -> bool:
        """Of the range's kind: a number (an integer for randint, lograndint); any value for a choice."""
        if self.kind == "choice":
            return True
        return isinstance(value, int if self.integer else (int, float)) and not isinstance(value, bool)

    def corners(self) -> list:
        """Values that show a config would accept the whole range: both ends, or every choice; for an
        integer range also every integer between when they are few (`chain.segments: {randint: [2, 8]}`
        draws 3, which has no toy shortcut), for a float range a fraction between (an integer key)."""
        if self.kind == "choice":
            return list(self.args)
        lo, hi = self.args
        if self.integer:
            return list(range(lo, hi + 1)) if hi - lo <= PROBED else [lo, hi]
        between = lo * (hi / lo) ** 0.37 if self.kind.startswith("log") else lo + 0.37 * (hi - lo)
        return [lo, between, hi]

    def ends(self) -> list:
        """Every choice, or the range's two ends: where a limit between two keys (`chain.segments <=
        chain.steps`) is crossed first."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]


@dataclass
class Space:
    name: str
    base: str
    fixed: dict = field(default_factory=dict)
    search: dict[str, Dimension] = field(default_factory=dict)
    points_to_evaluate: list[dict] = field(default_factory=list)


def _read(name_or_path: str) -> tuple[str, dict]:
    data = read_mapping(name_or_path, "shortft.spaces", "--space", "a mapping with base, fixed, search")
    name = name_or_path if name_or_path in builtin_names("shortft.spaces") else Path(name_or_path).stem
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"--space {name_or_path!r}: unknown section {sorted(unknown)[0]!r} "
                          "(allowed: base, fixed, search, points_to_evaluate)")
    for section, (kind, shape) in SECTIONS.items():
        if not isinstance(data.get(section) or kind(), kind):
            raise ConfigError(f"--space {name_or_path!r}: {section} must be {shape}")
        for key in data.get(section) or {} if kind is dict else ():  # `1:`, `null:`: an AttributeError traceback
            if not isinstance(key, str):
                raise ConfigError(f"{section}: {key!r} is no config key; keys are dotted names, e.g. chain.segments")
    return name, data


def check_key(key: str, where: str) -> None:
    known = {k for k, _, _ in describe()}
    if key in known:
        return
    if key.startswith(DYNAMIC) and key.count(".") >= 2:
        from shortft import rewards

        term = key.split(".")[2]
        rewards.check_name(f"{where} {key}", term)
        return
    raise ConfigError(f"{where}: unknown config key {key!r} (see `shortft config --keys`; reward weights are "
                      "reward.weights.<term>)")


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"search.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r} (allowed: {', '.join(KINDS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, e.g. {{choice: [2, 4, 8]}}")
        return Dimension(key, kind, list(args))
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)):
        raise ConfigError(f"{where}: {kind} needs [low, high], e.g. {{{kind}: [4, 128]}}, got {args!r}")
    lo, hi = args
    integer = kind.endswith("randint")
    if integer and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{where}: {kind} bounds must be integers, got {args!r}")
    if (lo > hi) if integer else (lo >= hi):
        raise ConfigError(f"{where}: empty range {args!r} (need low {'<=' if integer else '<'} high)")
    if kind.startswith("log") and lo <= 0:
        raise ConfigError(f"{where}: {kind} needs low > 0, got {args!r}")
    return Dimension(key, kind, [int(lo), int(hi)] if integer else [float(lo), float(hi)])


def check_default_space(name: str, config: str) -> None:
    """A space is written for its base config's model (the default one, toy, searches the toy's reward weights
    and fixes eval.objective=toy_judge): a --config of another model with no --space is refused in one line.
    It used to sweep the toy space on that model, GPU hours on weights of rewards the user never meant."""
    from shortft.config import read_config

    _, data = _read(name)
    base, model = data.get("base"), read_config(config).model.pretrained
    if base and read_config(base).model.pretrained != model:
        raise ConfigError(f"--config {config}: its model ({model}) is not the one the default space ({name}, for the "
                          f"{base} config) was written for; name the space to search: --space "
                          f"{' or '.join(builtin_names('shortft.spaces'))} (built in), or a YAML of your own (docs/sweeps.md)")


def _reward_modules(base: str, fixed: dict) -> list:
    """`reward.modules` of the base config with the fixed keys ([] where the base cannot be read: the checks say why)."""
    try:
        data = pin_paths(merge(read_mapping(base), nested(fixed)))
    except ConfigError:
        return []
    modules = (data.get("reward") or {}).get("modules") if isinstance(data.get("reward"), dict) else None
    return modules if isinstance(modules, list) else []


def _beside(base: str | None, space: str) -> str | None:
    """A space file's relative `base:` YAML: beside the space file, else from the working folder (a sweep resumed
    from another folder reads its stored space path: the working folder's named no file there, or another one)."""
    if not isinstance(base, str) or Path(base).is_absolute() or not Path(space).is_file():
        return base
    there = Path(space).parent / base
    return str(there.resolve()) if there.is_file() else base


def load_space(name_or_path: str, base: str | None = None, overrides: dict | None = None) -> Space:
    """Read and check a space. `base` replaces its base config; `overrides` (flat keys) win over
    `fixed` and remove those keys from the search (the smoke test uses this)."""
    name, data = _read(name_or_path)
    base = base or _beside(data.get("base"), name_or_path)
    if not base:
        raise ConfigError(f"--space {name_or_path!r}: no base config; add `base: toy` or pass --config")
    fixed, search = data.get("fixed") or {}, data.get("search") or {}
    from shortft.rewards.modules import import_all

    import_all(_reward_modules(base, fixed))  # before the keys: they may name the terms these modules register
    for key in fixed:
        check_key(key, "fixed")
        if key in search:  # the searched value won, though `fixed` is what every trial gets
            raise ConfigError(f"--space {name_or_path!r}: {key} is both in fixed ({fixed[key]!r}) and in search; "
                              "keep it in one of them")
    dims = {}
    for key, spec in search.items():
        check_key(key, "search")
        dims[key] = _dimension(key, spec)
    if not dims:
        raise ConfigError(f"--space {name_or_path!r}: search is empty; name at least one key, e.g. "
                          "chain.segments: {choice: [2, 4, 8]}")
    overrides = dict(overrides or {})
    fixed = {**fixed, **overrides}
    dims = {k: d for k, d in dims.items() if k not in overrides}
    points = []
    for i, point in enumerate(data.get("points_to_evaluate") or []):
        if not isinstance(point, dict):
            raise ConfigError(f"points_to_evaluate[{i}]: expected a mapping of searched keys to values")
        for key, value in point.items():
            if key in overrides:
                continue
            if key not in dims:
                raise ConfigError(f"points_to_evaluate[{i}]: {key!r} is not a searched key")
            if not dims[key].contains(value):
                how = ("lies outside" if dims[key].takes(value) else
                       f"is no {'integer' if dims[key].integer else 'number'} for")
                raise ConfigError(f"points_to_evaluate[{i}]: {key}={value!r} {how} its {dims[key].kind} "
                                  f"{dims[key].args}")
        unnamed = [k for k in dims if k not in point]
        if unnamed:  # Tune refuses it inside fit(), after Ray and the sweep's MLflow run had started
            raise ConfigError(f"points_to_evaluate[{i}]: give a value of every searched key; it has none for "
                              + ", ".join(unnamed))
        points.append({k: v for k, v in point.items() if k not in overrides})
    space = Space(name, base, fixed, dims, points)
    configs(space)
    return space


def trial_config(base: str | dict, fixed: dict, values: dict, name: str | None = None) -> Config:
    """The run config of one trial: base config, then the fixed keys, then the trial's values."""
    check_types(base, fixed=fixed, values=values)
    data = read_mapping(base) if isinstance(base, str) else base
    data = pin_paths(merge(merge(data, nested(fixed)), nested(values)))
    if name:
        data = merge(data, {"name": name})
    cfg = from_dict(Config, data)
    validate(cfg)
    return check(cfg)


def configs(space: Space) -> list[Config]:
    """The configs at every corner of every range (`Dimension.corners`: its ends, and values between; each
    point to evaluate too); each must be valid, so that no trial fails on a value the space allows. Raises
    a ConfigError naming the key otherwise."""
    try:
        out = [trial_config(space.base, space.fixed, {})]
    except ConfigError as e:
        raise ConfigError(f"base {space.base!r} with the fixed keys: {e}") from None
    first = {k: d.corners()[0] for k, d in space.search.items()}
    for key, dim in space.search.items():
        for value in dim.corners():
            try:
                out.append(trial_config(space.base, space.fixed, {**first, key: value}))
            except ConfigError as e:
                raise ConfigError(f"search.{key}={value!r} gives an invalid config: {e}") from None
    _check_pairs(space, first)
    for i, point in enumerate(space.points_to_evaluate):
        try:
            out.append(trial_config(space.base, space.fixed, {**first, **point}))
        except ConfigError as e:
            raise ConfigError(f"points_to_evaluate[{i}] gives an invalid config: {e}") from None
    return out


def _check_pairs(space: Space, first: dict) -> None:
    """Every two searched keys at their ends together: values valid one at a time can be invalid together
    (`chain.steps: {choice: [50, 6]}` with `chain.segments: {choice: [2, 8]}`), and the trial Optuna drew
    with both stopped the whole sweep, partway, in the driver."""
    keys = list(space.search)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            for va in space.search[a].ends():
                for vb in space.search[b].ends():
                    try:
                        trial_config(space.base, space.fixed, {**first, a: va, b: vb})
                    except ConfigError as e:
                        raise ConfigError(f"search.{a}={va!r} with search.{b}={vb!r} gives an invalid config: {e}; "
                                          "a trial may draw both: narrow a range, or search one of the two keys") from None


def to_tune(space: Space) -> dict:
    """The searched keys as Ray Tune domains (integer ranges include their upper end)."""
    from ray import tune

    def domain(d: Dimension):
        if d.kind == "choice":
            return tune.choice(d.args)
        lo, hi = d.args
        if d.kind.endswith("randint"):
            return getattr(tune, d.kind)(lo, hi + 1)  # Tune's upper end is exclusive
        return getattr(tune, d.kind)(lo, hi)

    return {key: domain(d) for key, d in space.search.items()}
