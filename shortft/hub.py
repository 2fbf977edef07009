"""The hub sources a config needs (base model, shortcut, reward models, prompt files): listed for `train --dry-run`,
and checked before anything loads them.

    for source in sources(cfg): ...   # key, value, what, repo, file, revision, variant
    check_sources([cfg], here=True)   # one-line ConfigError if a source can be neither read nor fetched

Without the check, a model that is neither in the hub cache nor reachable costs every process that
loads it half a minute of huggingface_hub's retries before the error; a sweep paid it for the untrained
model's evaluation and for every trial twice (Tune retries a failed trial), minutes of doomed trials
before its table of errors. The check asks the hub once per source, without retries.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple

from shortft.config import PARTS, Config, ConfigError
from shortft.plan import shortcut_of

TIMEOUT_S = 10.0  # one request per source not in the cache
COMPONENTS = {"StableDiffusionPipeline": "unet, vae, text_encoder, tokenizer, scheduler",
              "StableDiffusionXLPipeline": "unet, vae, text_encoder(_2), tokenizer(_2), scheduler"}


def is_hub(path: str) -> bool:
    from shortft.rewards.sources import is_local

    return not path.startswith("builtin:") and not is_local(path)


def _cached_path(repo: str, filename: str, revision: str | None, repo_type: str = "model") -> Path | None:
    """The file in this machine's hub cache (where `from_pretrained` looks first), or None; for a pattern
    (`*.safetensors`: a shortcut repo named without its file) the first cached file it matches."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if "*" in filename:
        try:
            snapshot = Path(snapshot_download(repo, revision=revision, repo_type=repo_type, local_files_only=True))
        except Exception:  # not in the cache (huggingface_hub's errors for it differ by version)
            return None
        return next(iter(sorted(snapshot.glob(filename))), None)
    found = try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type)
    return Path(found) if isinstance(found, str) else None


def unet_architecture(pretrained: str, revision: str | None = None) -> dict | None:
    """The UNet config (its keys without the `_` ones: the architecture) of a `model.pretrained` value as this
    machine holds it, read without a download or a build: a folder's `unet/`, a built-in's once built, the hub
    cache's; None where it is not here (a folder since moved, another machine's path)."""
    from shortft import builtin

    try:
        if pretrained.startswith("builtin:"):
            name = pretrained.split(":", 1)[1]
            file = (builtin.toy_dir() if name == "toy" else builtin.cache_dir() / f"{name}-v1") / "unet" / "config.json"
        elif is_hub(pretrained):
            file = _cached_path(pretrained, "unet/config.json", revision)
        else:
            file = Path(pretrained).expanduser() / "unet" / "config.json"
        return {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}
    except (AttributeError, OSError, ValueError):  # not cached (None), missing, unreadable, no repo id
        return None


class Source(NamedTuple):
    key: str  # the config key that names it
    value: str  # as the config has it
    what: str  # what the run loads from it
    repo: str
    file: str  # the file that tells the source is there (a pattern where the loader picks the file)
    revision: str | None = None
    variant: str | None = None  # a model's weight files (fp16: unet/diffusion_pytorch_model.fp16.safetensors)
    alt: str | None = None  # where `file` is not, this tells the source is there too (a pipeline's unet/config.json)
    repo_type: str = "model"  # "dataset": a prompt file (data.prompts=hf://datasets/<org>/<name>/<file>)


def reward_sources(cfg: Config, names: list[str] | None = None) -> list[Source]:
    """Each hub source the config's rewards (or those `names`) name: their defaults, or its options."""
    from shortft.rewards.registry import PATH_OPTIONS, defaults, packaged
    from shortft.rewards.sources import hub_repo_and_file

    out = []
    for name in names or dict.fromkeys([*cfg.reward.trained(), cfg.eval.objective, *cfg.eval.terms]):
        params = defaults(name)
        params.update(cfg.reward.options.get(name) or {})
        for key in sorted(PATH_OPTIONS & set(params)):
            value = params[key]
            if isinstance(value, str) and is_hub(value):
                filename = None
                if key == "path" and "version" in params:  # hps_v2: the file of its version
                    from shortft.rewards.preference import HPS_FILES

                    filename = params.get("file") or HPS_FILES[str(params["version"])]
                repo, file = hub_repo_and_file(value, filename)
                # the package's reward repos hold a config.json; a user's may not (an open_clip or a .pt repo):
                # any file of it tells it is there
                marker = file or ("config.json" if packaged(name) else "*")
                out.append(Source(f"reward.options.{name}.{key}", value, f"reward {name} ({key})", repo,
                                  marker, params.get("revision" if key == "path" else f"{key}_revision")))
    return out


def sources(cfg: Config, parts: Collection[str] = PARTS) -> list[Source]:
    """Every hub source the run would fetch: base model, and of `parts` (`shortft.config.PARTS`) the
    shortcut, reward models, prompt files."""
    from shortft.architectures import ARCHITECTURES, HUB_IDS

    rows = []
    model = cfg.model
    if is_hub(model.pretrained):
        kind = ARCHITECTURES[HUB_IDS[model.pretrained]]["pipeline"] if model.pretrained in HUB_IDS else None
        what = f"model ({COMPONENTS.get(kind, 'every component in model_index.json')}"
        what += f"; variant {model.variant})" if model.variant else ")"
        rows.append(Source("model.pretrained", model.pretrained, what, model.pretrained, "model_index.json",
                           model.revision, model.variant))
    shortcut = shortcut_of(model, cfg.chain) if "shortcut" in parts else None
    if shortcut and shortcut.kind != "none" and is_hub(shortcut.path):
        file = shortcut.weight_name or ("config.json" if shortcut.kind == "unet" else "*.safetensors")
        alt = "unet/config.json" if file == "config.json" else None  # a UNet repo, or a pipeline repo's unet/
        rows.append(Source("model.shortcut", model.shortcut.replace("{segments}", str(cfg.chain.segments)),
                           f"shortcut ({shortcut.kind})", shortcut.path, file, model.shortcut_revision, alt=alt))
    return rows + (reward_sources(cfg) if "rewards" in parts else []) + prompt_sources(cfg, parts)


def prompt_sources(cfg: Config, parts: Collection[str] = PARTS) -> list[Source]:
    """The prompt files of `data.prompts` / `data.eval_prompts` on the hub (hf://datasets/<org>/<name>/<file>)."""
    from shortft.data import HUB_DATASET, hub_dataset_file

    rows = []
    for key in [key for key in ("prompts", "eval_prompts") if key in parts]:
        value = getattr(cfg.data, key)
        if isinstance(value, str) and value.startswith(HUB_DATASET):
            repo, file = hub_dataset_file(value, f"data.{key}")
            rows.append(Source(f"data.{key}", value, f"{key.replace('_', ' ')} (dataset file)", repo, file,
                               repo_type="dataset"))
    return rows


# Pipeline components that hold no weights, or that the run does not load (load_pipeline passes None).
_NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler")
_NOT_LOADED = ("safety_checker", "feature_extractor")
_WEIGHTS = ("*.safetensors", "*.bin")  # single files or shards, the variant or not: from_pretrained takes either


def weightless(src: Source) -> list[str] | None:
    """None where the source's marker file is not in the hub cache; else the folders of its cached snapshot
    that the loader reads weights from and that hold none ("" for the repo's top level): what an
    interrupted or too narrow `hf download` leaves, which fails at load where the hub cannot be asked."""
    marker = _cached_path(src.repo, src.file, src.revision, src.repo_type)
    if marker is None and src.alt:
        marker = _cached_path(src.repo, src.alt, src.revision)
    if marker is None or marker.name not in ("model_index.json", "config.json") or src.key.endswith(".processor"):
        return None if marker is None else []  # a weight file itself, or a processor (no weights)
    snapshot = marker.parent
    if marker.name == "config.json":  # one model's folder (a reward's CLIP, a shortcut UNet)
        folders = [""]
    else:
        index = json.loads(marker.read_text() or "{}")
        folders = [name for name, value in index.items() if isinstance(value, list) and len(value) == 2 and value[1]
                   and name not in _NOT_LOADED and not str(value[1]).endswith(_NO_WEIGHTS)]
    # a snapshot's files are links to blobs; an interrupted download leaves none, or a dangling one
    return [f for f in folders if not any(w.exists() for pattern in _WEIGHTS for w in (snapshot / f).glob(pattern))]


def in_folders(folders: list[str]) -> str:
    return "in " + ", ".join(f"{f}/" if f else "the top folder" for f in folders)


# The weight files of an SD 1.x/2.x or SDXL pipeline that the chain loads (text_encoder_2: SDXL's).
PIPELINE_WEIGHTS = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder*/model")


def download_command(src: Source, folders: list[str] | None = None) -> str:
    """The `hf download` that fetches the source (only the weights of `folders`, where given)."""
    file = weight_file(src)
    command = f"hf download {src.repo}{' ' + file if file else ''}"
    if src.repo_type != "model":
        command += f" --repo-type {src.repo_type}"
    if src.revision:
        command += f" --revision {src.revision}"
    variant = f".{src.variant}" if src.variant else ""
    if src.file == "model_index.json" and not folders:
        # a pipeline's configs, tokenizer files and the weights the chain loads, of this variant: not the whole
        # repo, whose single-file checkpoints are several times the size, nor (`*/*.safetensors` took them) its
        # other variants, non-EMA UNet, safety checker or SDXL's vae_1_0
        return command + ' --include "*.json" --include "*.txt"' + "".join(
            f' --include "{stem}{variant}.safetensors"' for stem in PIPELINE_WEIGHTS)
    return command + "".join(f' --include "{f}/*{variant}.safetensors"' for f in folders or [] if f)


def weight_file(source: Source) -> str | None:
    """The one file of the source to name (a weight file), or None where the repo as a whole is meant."""
    return None if "*" in source.file or source.file in ("model_index.json", "config.json") else source.file


def _on_hub(repo: str, filename: str, revision: str | None, repo_type: str = "model") -> tuple[str, str] | None:
    """None where the hub has the file; else ('missing' or 'unreachable', why)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        if "*" in filename:
            HfApi().repo_info(repo, revision=revision, repo_type=repo_type, timeout=TIMEOUT_S)
        else:
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, repo_type=repo_type), timeout=TIMEOUT_S)
        return None
    except GatedRepoError:
        return "missing", "a gated repo: accept its terms on its hub page, then log in with `hf auth login`"
    except RepositoryNotFoundError:
        return "missing", "no such repo on the hub (or a private one: log in with `hf auth login`)"
    except RevisionNotFoundError:
        return "missing", f"the repo has no revision {revision!r}"
    except EntryNotFoundError:
        return "missing", f"the repo has no file {filename}"
    except OfflineModeIsEnabled:
        return "unreachable", "HF_HUB_OFFLINE is set"
    except Exception as e:  # no network, no DNS, a proxy, a timeout: the hub cannot be asked from here
        return "unreachable", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"


def check_sources(cfgs: list[Config], here: bool = True, warn=None, parts: Collection[str] = PARTS) -> None:
    """Raise a one-line ConfigError naming the key of the first hub source of `cfgs` that is not (wholly) in
    this machine's hub cache and that the hub says it does not have, or, with `here` (the processes that load
    it run on this machine), that the hub cannot be asked for. Without `here` an unreachable hub gets one
    `warn` line: the machines that load the sources may have them, or the network. Only the base models
    and those of `parts` are checked."""
    check([src for cfg in cfgs for src in sources(cfg, parts)], here, warn)


def check(srcs: list[Source], here: bool = True, warn=None) -> None:
    """`check_sources` of these sources."""
    seen, unreachable = set(), []
    for src in srcs:
        once = (src.repo, src.file, src.revision, src.key.endswith(".processor"))  # a processor needs no weights
        if once in seen:
            continue
        seen.add(once)
        empty = weightless(src)
        if empty == []:
            continue
        problem = _on_hub(src.repo, src.file, src.revision, src.repo_type)
        if problem is None:
            continue  # the loader fetches what the cache lacks
        kind, why = problem
        if kind == "missing" and src.alt and _on_hub(src.repo, src.alt, src.revision) is None:
            continue
        if kind == "missing":
            raise ConfigError(f"{src.key}={src.value!r}: {why}")
        if here:
            file = weight_file(src)
            if empty:
                held = f"the hub cache holds {src.repo}'s {src.file} but no weights {in_folders(empty)}"
                fix = download_command(src, empty)
            else:
                held = f"{src.repo + '/' + file + ' is ' if file else ''}not in this machine's hub cache"
                fix = download_command(src)
            raise ConfigError(f"{src.key}={src.value!r}: {held}, and the hub cannot be asked ({why}); download it "
                              f"first ({fix}), or set {src.key} to a local {'file' if src.repo_type == 'dataset' else 'folder'}")
        unreachable.append((src.key, why))
    if unreachable and warn is not None:
        warn(f"note: {', '.join(dict.fromkeys(k for k, _ in unreachable))}: not in this machine's hub cache, and the "
             f"hub cannot be asked from here ({unreachable[0][1]}); the machines that load them must have them")
