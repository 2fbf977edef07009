"""Prompts: a list in the config, or a file.

    data.prompts: [a photo of a cat, ...]                       a list
    data.prompts: prompts.txt                                  one prompt a line
    data.prompts: prompts.jsonl | prompts.csv | prompts.parquet  column `data.prompt_column` (pyarrow)
    data.prompts: hf://datasets/org/name/train.parquet          a file of a hub dataset (downloaded once)
    data.prompts: builtin:prompts/hpd_style_train.txt           a set that ships with the package
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache
from pathlib import Path

from shortft import builtin
from shortft.config import Config, ConfigError
from shortft.progress import warn

TABLES = (".jsonl", ".csv", ".parquet")
REFUSED = (".json", ".tsv", ".xlsx", ".xls", ".arrow", ".feather", ".pkl", ".gz", ".zip")  # not text, one prompt a line
HUB_DATASET = "hf://datasets/"


def _local(value: str, key: str) -> Path:
    """A local path for `value`; a hub dataset file is downloaded (or found in the hub cache)."""
    if not value.startswith(HUB_DATASET):
        return Path(builtin.resolve_path(value)).expanduser()
    repo, file = hub_dataset_file(value, key)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, file, repo_type="dataset"))
    except Exception as e:  # offline, no such repo or file: one line either way
        raise ConfigError(f"{key}={value!r}: could not get the file ({(str(e).splitlines() or [type(e).__name__])[0]})") from None


def _column(path: Path, column: str, key: str) -> list[str]:
    import pyarrow
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    read = {".jsonl": pyarrow.json.read_json, ".csv": pyarrow.csv.read_csv, ".parquet": pyarrow.parquet.read_table}
    try:
        table = read[path.suffix.lower()](path)
    except (pyarrow.ArrowInvalid, OSError) as e:  # not the file its suffix says: one line, not pyarrow's traceback
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}={str(path)!r}: not a readable {path.suffix} file ({reason})") from None
    if column not in table.column_names:
        raise ConfigError(f"{key}={str(path)!r}: no column {column!r} (it has {', '.join(table.column_names)}); "
                          "set data.prompt_column")
    return [str(p).strip() for p in table.column(column).to_pylist() if p is not None and str(p).strip()]


def read_prompts(value: list | str, column: str = "prompt", key: str = "data.prompts") -> list[str]:
    """A list as is; a file as the module docstring says (empty lines and empty cells dropped)."""
    if not isinstance(value, str):
        return list(value)
    path = _local(value, key)
    if not path.is_file():
        kinds = f"a .txt (one prompt a line), {', '.join(TABLES)} (column data.prompt_column)"
        raise ConfigError(f"{key}={value!r}: {'a folder' if path.is_dir() else 'no such file'}; give "
                          f"{'a list, ' if key.startswith('data.') else ''}{kinds} "
                          "or hf://datasets/<org>/<name>/<file>")
    stat = path.stat()
    return list(_read_file(str(path), (stat.st_mtime_ns, stat.st_size), column, key, value))


@lru_cache(maxsize=16)
def _read_file(path: str, version: tuple, column: str, key: str, value: str) -> tuple[str, ...]:
    # cached by the file's mtime and size: a sweep's driver checks the same file for every trial's config
    path = Path(path)
    if path.suffix.lower() in REFUSED:  # read as text, its lines would be `[` and `"a cat",`
        raise ConfigError(f"{key}={value!r}: a {path.suffix} file is not read; give a .txt (one prompt a line), or "
                          f"{', '.join(TABLES)} (column data.prompt_column={column!r})")
    if path.suffix.lower() in TABLES:
        prompts = _column(path, column, key)
    else:
        try:
            # utf-8-sig: a byte-order mark (a Windows editor's) stayed at the start of the first prompt
            prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}={value!r}: not a readable text file, one prompt a line ({e})") from None
    if not prompts:
        raise ConfigError(f"{key}={value!r}: the file holds no prompts")
    return tuple(prompts)


def check_prompts(cfg: Config, keys: Collection[str] = ("prompts", "eval_prompts")) -> None:
    """`data.prompts` / `data.eval_prompts` given as local files must exist and hold prompts in
    `data.prompt_column` (hub files are fetched, and so checked, before the run loads its models). The
    evaluation file was first read by the first evaluation, which in configs that evaluate only at the
    end came after the last step and before the LoRA was saved."""
    for key in keys:
        value = getattr(cfg.data, key)
        if isinstance(value, str) and not value.startswith(HUB_DATASET):
            read_prompts(value, cfg.data.prompt_column, f"data.{key}")
        elif isinstance(value, str):
            hub_dataset_file(value, f"data.{key}")


def hub_dataset_file(value: str, key: str) -> tuple[str, str]:
    """(repo id, file) of `hf://datasets/<org>/<name>/<file>`; a ConfigError naming `key` for anything else
    (a revision, `@main`, is not taken: the hub's own check raised a traceback from the source listing)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = value[len(HUB_DATASET):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ConfigError(f"{key}={value!r}: expected hf://datasets/<org>/<name>/<file>")
    repo = "/".join(parts[:2])
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ConfigError(f"{key}={value!r}: {repo!r} is no hub dataset id (letters, digits, - _ . only; no "
                          "@revision); expected hf://datasets/<org>/<name>/<file>") from None
    return repo, "/".join(parts[2:])


def run_prompts(cfg: Config) -> list[str]:
    """A run's training prompts, its evaluation prompts read too: a hub dataset's file is fetched (and a
    bad one refused) before the models load, not at the first evaluation, after the last step."""
    held_out = read_prompts(cfg.data.eval_prompts, cfg.data.prompt_column, "data.eval_prompts")
    prompts = read_prompts(cfg.data.prompts, cfg.data.prompt_column)
    shared = {p.casefold() for p in prompts} & {p.casefold() for p in held_out}
    if shared:  # nothing checked it: an evaluation on training prompts read as held-out
        warn(f"shortft: {len(shared)} of the {len(set(held_out))} evaluation prompts are training prompts too "
             f"(e.g. {sorted(shared)[0]!r}): the evaluation is not held out")
    return prompts
