"""Where a command will write, checked before the work: a grid, a JSON file or a run folder that cannot
be written there once failed only at the end (PIL's "unknown file extension" after the evaluation, an
IsADirectoryError after a whole bench, FileExistsError as a run started), its results unsaved."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shortft.config import ConfigError


@contextmanager
def whole(path: Path) -> Iterator[Path]:
    """The temporary file beside `path` to write, renamed over `path` once the block ends (a full disk or a
    kill while writing left a file cut short, which the next reader failed on); removed if it raises. One
    there before is removed first: a link planted under that name was written through. Renaming over
    `path` replaces a link there, never its target."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_whole(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all (`whole`)."""
    with whole(path) as tmp:
        tmp.write_text(text)


def refuse_links(flag: str, folder: Path) -> None:
    """A ConfigError naming the first symbolic link inside `folder` (the folder itself may be one). A run
    folder received from someone or kept on shared storage with `metrics.jsonl -> ~/.bashrc` had a resume
    append its rows there, and a linked `.shortft.lock` had its target replaced."""
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root, name)
            if path.is_symlink():
                raise ConfigError(f"{flag} {folder}: {path.relative_to(folder)}: a symbolic link (to "
                                  f"{os.readlink(path)}); a run folder holds none, as the run writes through "
                                  "them: put the file itself there, or remove the link")


def image_suffixes() -> tuple[str, ...]:
    """The suffixes PIL writes an image as (`save_grid` saves by the path's suffix), common ones first."""
    from PIL import Image

    Image.init()
    writes = {e for e, kind in Image.registered_extensions().items() if kind in Image.SAVE}
    common = (".png", ".jpg", ".jpeg", ".webp")
    return tuple(e for e in common if e in writes) + tuple(sorted(writes - set(common)))


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_parent(flag: str, path: Path) -> None:
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder; give a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable here; give a path you can write")


def output_file(flag: str, path: str | Path, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` as a file to be written (its folders made if missing), or a ConfigError naming `flag`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: a folder; give a file path, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    if suffixes and path.suffix.lower() not in suffixes:
        more = f" (or another of the {len(suffixes)} this accepts)" if len(suffixes) > 4 else ""
        raise ConfigError(f"{flag} {path}: give a file ending in {', '.join(suffixes[:4])}{more}")
    _check_parent(flag, path)
    return path


def output_folder(flag: str, path: str | Path) -> Path:
    """`path` as a folder to be written in (made if missing), or a ConfigError naming `flag`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: a file; give a folder (made if missing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: not writable here; give a folder you can write")
        return path
    _check_parent(flag, path)
    return path
