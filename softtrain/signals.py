"""Stop signals: SIGTERM (what schedulers send before pre-emption) and SIGINT (Ctrl-C)
stop a run at the next step, after ``last.pt`` is saved."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after ``last.pt`` was saved at ``step``."""

    def __init__(self, signum: int, step: int, out: Path):
        self.signum, self.step = signum, step
        super().__init__(
            f"{signal.Signals(signum).name}: stopped at step {step} with {out / 'last.pt'} "
            f"saved; continue with: softtrain fit --out {out} --resume"
        )


@contextmanager
def stop_signals():
    """Within: SIGTERM and SIGINT only set ``flag["signum"]`` (the loop saves and stops at
    the next step). Outside the main thread nothing is installed."""
    flag = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
