"""An exclusive lock on a file (fcntl), held while one process does what no other may do at once:
fit a reward model (`reward_fit.fit_lock`), train a run of an experiment (`experiment_runs.run_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def file_lock(path: str, wait: bool, on_wait=None):
    """Yields True while this process holds the lock on `path` (created if missing). Held by another
    process: with `wait`, calls on_wait() and blocks until it is free; without, yields False at once."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
