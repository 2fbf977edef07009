"""Where a Ray Train run keeps its state: the storage path (checked before any worker starts), the
run's name in it (found again by `--resume`), and whether a run of that name is there.

    check_storage_path("s3://bucket/shortft")   # one ConfigError line, within 30 s, if not writable
    name = name_in_storage(cfg, storage_path, resume=True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import urllib.parse
import uuid
from pathlib import Path

from shortft import run_record
from shortft.config import Config, ConfigError, to_dict


def run_name(cfg: Config) -> str:
    """The Ray run of `cfg`'s run folder: `--resume` finds it whatever settings changed since (a longer
    `train.steps`, the settings an out-of-memory line offers), as a run in one process is its folder.
    The name was a digest of the whole config: any changed setting named another run, and the resume
    was refused."""
    digest = hashlib.sha1(str(cfg.output_dir.resolve()).encode()).hexdigest()[:8]
    return f"{cfg.name}-{digest}"


def name_in_storage(cfg: Config, storage_path: str, resume: bool) -> str:
    """`run_name(cfg)`; on `resume`, where no run of that name is in the storage path: the name the run
    folder recorded (it moved here), else a run that an earlier version named by its config digest (the
    same config)."""
    name = run_name(cfg)
    if resume and not run_exists(storage_path, name):
        kept, own = run_record.recorded(cfg.output_dir, "ray")  # the folder moved: the name it ran under
        if own and isinstance(kept.get("name"), str) and run_exists(storage_path, kept["name"]):
            return kept["name"]
        digest = hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
        if run_exists(storage_path, f"{cfg.name}-{digest}"):
            return f"{cfg.name}-{digest}"
    return name


def resolve_storage_path(given: str | None) -> str:
    """The storage path to hand Ray: a URI as given; a local folder absolute (Ray's pyarrow filesystem took
    `--storage-path rr` for a URI without a scheme: a traceback, after the sweep's record was written),
    `./ray_results` if none is given."""
    if given and "://" in given:
        return given
    return str(Path(given or "ray_results").expanduser().resolve())


STORAGE_CHECK_S = 30.0  # a remote storage path that has not answered by then is not usable from here


def check_storage_path(path: str) -> None:
    """Fail before any worker starts if checkpoints could not be written there."""
    parts = urllib.parse.urlsplit(path) if "://" in path else None
    if parts is not None and (parts.password is not None or parts.username is not None):
        # pyarrow takes s3://KEY:SECRET@bucket, and the path is printed and stored with the sweep's settings
        raise ConfigError(f"storage path {parts.scheme}://...@{parts.hostname}{parts.path}: holds credentials, which "
                          "would be printed and stored with it; give them the cloud's own way (AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, a profile, an instance role) and the path without them")
    if "://" in path:
        import threading

        import pyarrow.fs

        failed: list[BaseException] = []

        def probe() -> None:
            try:
                fs, root = pyarrow.fs.FileSystem.from_uri(path)
                fs.create_dir(root, recursive=True)
            except Exception as e:  # any failure means: not usable from here
                failed.append(e)

        # pyarrow's GCS client retries an unreachable endpoint for minutes (seen: over 60 s offline)
        asking = threading.Thread(target=probe, daemon=True)
        asking.start()
        asking.join(STORAGE_CHECK_S)
        if asking.is_alive():
            raise ConfigError(f"storage path {path}: no answer within {STORAGE_CHECK_S:g} s; check the network, the "
                              "URI and credentials, or pass another --storage-path")
        if failed:
            e = failed[0]
            raise ConfigError(f"storage path {path}: not writable ({type(e).__name__}: {e}); check the URI and "
                              "credentials or pass another --storage-path") from None
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"storage path {path}: a file, not a folder; pass --storage-path to a folder (made if "
                          "missing), or s3://..., an NFS mount on clusters")
    # the folders this check makes are removed after it: a sweep refused after it left an empty ./ray_results
    made = [a for a in (p.absolute(), *p.absolute().parents) if not a.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage path {path}: not writable ({e.strerror or e}); pass --storage-path to a "
                          "writable directory (or s3://..., an NFS mount on clusters)") from None
    finally:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


RAY_MARKER = ".validate_storage_marker"  # what Ray writes first into a run's folder


def run_exists(storage_path: str, name: str) -> bool:
    """A run of that name holds anything in the storage path. Ray's marker alone is an attempt that stopped
    before its first checkpoint: nothing to resume (a new start was refused as "already exists" for good,
    and a resume from it started at step 0 anyway)."""
    if "://" in storage_path:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        held = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{name}", allow_not_found=True))
        return any(Path(info.path).name != RAY_MARKER for info in held)
    d = Path(storage_path).expanduser() / name
    return d.is_dir() and any(p.name != RAY_MARKER for p in d.iterdir())


def check_resumed_workers(storage_path: str, name: str, workers: int) -> None:
    """A resume with another worker count is refused by the workers as they resume, once Ray has started and
    the models have loaded (26 s here): a local storage path's latest checkpoint is read first."""
    from shortft import checkpoint
    from shortft.resume_settings import check_workers
    from shortft.safe_load import Unreadable

    if "://" in storage_path:
        return
    held = checkpoint.latest(Path(storage_path).expanduser() / name)
    with contextlib.suppress(Unreadable):  # the resume goes back to the one before it, saying so
        if held is not None:
            check_workers(held, checkpoint.read_state(held), workers)
