"""Ctrl-C or SIGTERM of a `--workers` run: the workers stop after the step in progress, with a checkpoint.

Ray Train's own Ctrl-C handler aborts the run: the workers die wherever they are, and the last report
the controller had not taken yet was lost with its checkpoint (seen: checkpoints every 5 steps, step 20
reported, the resume started at step 15). Now the driver's first signal writes a file next to the run's
checkpoints (the storage path: every worker's node reaches it), rank 0 sees it within a second, and
the step's all-reduce carries it to every rank (`StopRequest.agree`): all stop after the same step,
rank 0's checkpoint of it is reported, and the workers end normally (Ray Train does not restart them).
A second signal aborts as Ray Train's handler does; a third exits. A file that cannot be written (the
storage unreachable, credentials expired) aborts at once, with the reason.

    channel = StopChannel(storage_path, run_name)     # driver: `handle` while fit waits
    with polled(channel.where) as asked:              # rank 0: asked() -> the signal number, 0 for none
        train(cfg, ..., asked=asked)
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shortft.interrupt import SIGNALS
from shortft.ray_storage import resolve_storage_path

STOP_FILE = ".shortft-stop"
POLL_S = 1.0


def _opened(where: tuple[str, str]):
    """(filesystem, path of the stop file) of `where` = (storage path, run name). The path is joined on
    the root pyarrow parses: a URI's query (`s3://b/p?endpoint_override=...`) stays out of it."""
    import pyarrow.fs

    storage_path, name = where
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    return fs, f"{root.rstrip('/')}/{name}/{STOP_FILE}"


def _is_file(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


class StopChannel:
    """The file by which the driver asks a Ray Train run's workers to stop (`<storage>/<run>/.shortft-stop`)."""

    def __init__(self, storage_path: str, name: str):
        self.where = (resolve_storage_path(storage_path), name)
        self.signal: signal.Signals | None = None

    def clear(self) -> None:
        """A request left by an earlier stop of this run would stop its resume at once."""
        fs, path = _opened(self.where)
        if _is_file(fs, path):
            fs.delete_file(path)

    def ask(self, signum: int) -> None:
        fs, path = _opened(self.where)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(str(int(signum)).encode())

    def handle(self, controller) -> None:
        """Ray Train's SIGINT handler, replaced while `fit` waits on `controller` (also for SIGTERM). The
        handler only starts the write: storage I/O (retried for minutes on an unreachable GCS) must not
        hold up a second signal."""
        import ray

        count = 0

        def abort(why: str) -> None:
            print(f"\nshortft: {why}: aborting the run now", file=sys.stderr, flush=True)
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:  # the controller exits as it aborts
                if threading.current_thread() is threading.main_thread():
                    sys.exit(0)  # as Ray Train's handler: fit ends in SystemExit (else in the controller's death)

        def ask(signum: int) -> None:
            try:
                self.ask(signum)
            except Exception as e:  # the workers cannot be asked: stop them as Ray Train would
                abort(f"the stop request could not be written to {self.where[0]} ({type(e).__name__}: {e})")

        def received(signum, frame) -> None:
            nonlocal count
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                self.signal = signal.Signals(signum)
                print(f"\nshortft: {name}: the workers stop after this step, with a checkpoint (again to abort now)",
                      file=sys.stderr, flush=True)
                threading.Thread(target=ask, args=(signum,), daemon=True, name="shortft-stop-ask").start()
            elif count == 2:
                abort(f"{name} again")
            else:
                sys.exit(0)

        for s in SIGNALS:
            signal.signal(s, received)


@contextmanager
def polled(where: tuple[str, str], every: float = POLL_S) -> Iterator[Callable[[], int]]:
    """`asked()`: the signal number the driver asked the workers to stop with, 0 while none; read by a
    thread every `every` seconds (a stat, or a HEAD request on s3://), never in the step itself."""
    seen, done = [0], threading.Event()

    def poll() -> None:
        fs = path = None
        while not done.is_set() and not seen[0]:
            try:
                if fs is None:
                    fs, path = _opened(where)
                if _is_file(fs, path):
                    with fs.open_input_stream(path) as f:
                        seen[0] = int(f.read().decode() or signal.SIGINT)
            except (OSError, ValueError):  # storage briefly unreachable, a half-written file: ask again
                pass
            done.wait(every)

    thread = threading.Thread(target=poll, daemon=True, name="shortft-stop-poll")
    thread.start()
    try:
        yield lambda: seen[0]
    finally:
        done.set()
