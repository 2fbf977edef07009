"""Where a reward model's files come from: a local folder or file, a hub repo, or one file in a hub repo.

    folder(key, "yuvalkirstain/PickScore_v1")          -> "yuvalkirstain/PickScore_v1" (from_pretrained takes it)
    folder(key, "/models/pickscore")                    -> "/models/pickscore" (checked to exist)
    file(key, "xswu/HPSv2", "HPS_v2_compressed.pt")     -> the cached download of that file
    file(key, "org/repo/sub/file.pth")                  -> the cached download of sub/file.pth
    file(key, "/models/hps", "HPS_v2_compressed.pt")    -> /models/hps/HPS_v2_compressed.pt

Every failure is a ConfigError naming the option key (`reward.options.<name>.path`) and the fix.
"""

from __future__ import annotations

from pathlib import Path

from shortft.builtin import looks_like_path
from shortft.config import ConfigError


def is_local(path: str) -> bool:
    return looks_like_path(path) and not _hub_file(path) or Path(path).expanduser().exists()


def _hub_file(path: str) -> bool:
    # org/repo/file.ext: a file inside a hub repo (as `model.shortcut: lora:org/repo/file` takes it).
    return not path.startswith(("/", ".", "~")) and path.count("/") >= 2 and "." in path.rsplit("/", 1)[1]


def hub_repo_and_file(path: str, filename: str | None = None) -> tuple[str, str | None]:
    """`org/repo/<file>` -> (org/repo, file); `org/repo` -> (org/repo, filename)."""
    if _hub_file(path):
        parts = path.split("/")
        return "/".join(parts[:2]), "/".join(parts[2:])
    return path, filename


def check_exists(key: str, path: str) -> None:
    """A local path must exist (hub ids are checked when loaded); run by `check(cfg)` before anything starts."""
    if is_local(path) and not Path(path).expanduser().exists():
        raise ConfigError(f"{key}={path!r}: no such file or folder; give a hub id (org/name) or an existing path")


def folder(key: str, path: str) -> str:
    """A model folder: a local dir that exists, or a hub id (checked when loaded)."""
    check_exists(key, path)
    if is_local(path):
        p = Path(path).expanduser()
        if p.is_file():
            raise ConfigError(f"{key}={path!r} is a file; this reward takes a transformers model folder or hub id")
        return str(p)
    return path


def file(key: str, path: str, filename: str | None = None, revision: str | None = None) -> Path:
    """One weights file: local (a file, or `filename` in a folder) or from the hub (downloaded once)."""
    check_exists(key, path)
    if is_local(path):
        p = Path(path).expanduser()
        if p.is_dir():
            if filename is None or not (p / filename).is_file():
                held = ", ".join(sorted(q.name for q in p.iterdir())[:6]) or "nothing"
                raise ConfigError(f"{key}={path!r}: no {filename} in that folder (it holds {held})")
            return p / filename
        return p
    repo, filename = hub_repo_and_file(path, filename)
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as e:  # offline, no such repo/file, gated: one line either way
        raise ConfigError(f"{key}={path!r}: could not get {filename} from the hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); give a local path") from None
