"""Ctrl-C or SIGTERM of a `--workers` run: the workers stop after the step in progress, with a checkpoint.

Ray Train's own Ctrl-C handler aborts the run: the workers die wherever they are, and the last report
the controller had not taken yet was lost with its checkpoint (seen: checkpoints every 5 steps, step 20
reported, the resume started at step 15). Now the driver's first signal writes a file next to the run's
checkpoints (the storage path: every worker's node reaches it), rank 0 sees it within a second, and
the step's all-reduce carries it to every rank (`StopRequest.agree`): all stop after the same step,
rank 0's checkpoint of it is reported, and the workers end normally (Ray Train does not restart them).
A second signal aborts as Ray Train's handler does; a third exits.

    channel = StopChannel(storage_path, run_name)     # driver: `handle` while fit waits
    with polled(channel.uri) as asked:                # rank 0: asked() -> the signal number, 0 for none
        train(cfg, ..., asked=asked)
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shortft.interrupt import SIGNALS

STOP_FILE = ".shortft-stop"
POLL_S = 1.0


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _read(uri: str) -> int:
    import pyarrow.fs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return 0
    with fs.open_input_stream(path) as f:
        return int(f.read().decode() or signal.SIGINT)


class StopChannel:
    """The file by which the driver asks a Ray Train run's workers to stop (`<storage>/<run>/.shortft-stop`)."""

    def __init__(self, storage_path: str, name: str):
        from pathlib import Path

        root = storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())
        self.uri = f"{root.rstrip('/')}/{name}/{STOP_FILE}"
        self.signal: signal.Signals | None = None

    def clear(self) -> None:
        """A request left by an earlier stop of this run would stop its resume at once."""
        import pyarrow.fs

        fs, path = _fs(self.uri)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(path)

    def ask(self, signum: int) -> None:
        fs, path = _fs(self.uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(str(int(signum)).encode())
        self.signal = signal.Signals(signum)

    def handle(self, controller) -> None:
        """Ray Train's SIGINT handler, replaced while `fit` waits on `controller` (also for SIGTERM)."""
        import ray

        count = 0

        def received(signum, frame) -> None:
            nonlocal count
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                self.ask(signum)
                print(f"\nshortft: {name}: the workers stop after this step, with a checkpoint (again to abort now)",
                      file=sys.stderr, flush=True)
            elif count == 2:
                print(f"\nshortft: {name}: aborting the run now (again to exit)", file=sys.stderr, flush=True)
                try:
                    ray.get(controller.abort.remote())
                except ray.exceptions.RayActorError:
                    sys.exit(0)
            else:
                sys.exit(0)

        for s in SIGNALS:
            signal.signal(s, received)


@contextmanager
def polled(uri: str, every: float = POLL_S) -> Iterator[Callable[[], int]]:
    """`asked()`: the signal number the driver asked the workers to stop with, 0 while none; read by a
    thread every `every` seconds (a stat, or a HEAD request on s3://), never in the step itself."""
    seen, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set() and not seen[0]:
            try:
                seen[0] = _read(uri)
            except (OSError, ValueError):  # storage briefly unreachable, a half-written file: ask again
                pass
            done.wait(every)

    thread = threading.Thread(target=poll, daemon=True, name="shortft-stop-poll")
    thread.start()
    try:
        yield lambda: seen[0]
    finally:
        done.set()
