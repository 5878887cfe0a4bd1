"""What a run leaves to read: ``metrics.jsonl``, TensorBoard scalars and ``curves.png``.

``metrics.jsonl``: one JSON object per line, each with ``type`` and ``time`` (ISO 8601,
UTC). ``type = "train"``: the fields of ``StepLog``. ``type = "eval"``: the fields of
``softtrain.metrics.eval_record`` (aAcc, mIoU, mAcc, classes) plus step, split and level.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class StepLog:
    """Training progress every ``log_every`` steps (rates over the steps since the last)."""

    step: int
    iters: int
    loss: float
    kl: float
    lr: float
    crops_per_s: float
    data_wait_share: float  # share of wall time spent waiting for the loader
    peak_memory_gib: float | None  # CUDA peak allocated since the start (None on CPU)
    eta_s: float  # seconds to the last step at this run's mean speed


class Throughput:
    """Crops/s, the share of time spent waiting for data, peak memory and the ETA between
    two reports, counting training time only (evaluations and saves are ``paused``)."""

    def __init__(self, step: int, iters: int):
        self.step_start, self.iters = step, iters
        self.t_start = self.t_log = time.perf_counter()
        self.wait, self.seen = 0.0, 0

    @contextmanager
    def waiting(self):
        t0 = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t0

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        yield
        self.t_log += time.perf_counter() - t0

    def saw(self, crops: int) -> None:
        self.seen += crops

    def report(self, step: int, device) -> dict:
        """The ``StepLog`` rate fields since the last report (which this starts anew)."""
        import torch

        now_ = time.perf_counter()
        cuda = device.type == "cuda"
        rates = dict(
            crops_per_s=self.seen / (now_ - self.t_log),
            data_wait_share=self.wait / (now_ - self.t_log),
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            eta_s=(self.iters - step) * (now_ - self.t_start) / (step - self.step_start),
        )
        self.t_log, self.wait, self.seen = time.perf_counter(), 0.0, 0
        return rates


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; a torn last line (a crash mid-write) is skipped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class RunLog:
    """Appends records to ``<out>/metrics.jsonl`` and reports them to the run's
    ``trackers`` (``softtrain.tracking``); ``plot()`` redraws ``<out>/curves.png``. A resumed
    run drops records past its step."""

    def __init__(self, out: Path, trackers=(), options=None, resume_step: int | None = None):
        self.out = Path(out)
        self.path = self.out / "metrics.jsonl"
        if resume_step is not None:  # records after the checkpoint will be written again
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.trackers = []
        try:
            for tracker in trackers:
                tracker.start(options or {}, resume_step)
                self.trackers.append(tracker)
        except BaseException:  # those started end their runs: no one else will
            self.close()
            raise

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def _scalars(self, step: int, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def train(self, log: StepLog) -> None:
        self._append({"type": "train", "time": now()} | asdict(log))
        keys = ("loss", "kl", "lr", "crops_per_s", "data_wait_share")
        self._scalars(log.step, {f"train/{k}": getattr(log, k) for k in keys})

    def eval(self, record: dict, pictures=()) -> None:
        """An evaluation record, and ``pictures``: (name, (H, W, 3) uint8) to show."""
        self._append({"type": "eval", "time": now()} | record)
        step = record["step"]
        values = {f"val/{k}": record[k] for k in ("aAcc", "mIoU", "mAcc")}
        values |= {f"val_iou/{row['class']}": row["iou"] for row in record["classes"]}
        self._scalars(step, values)
        for name, image in pictures:
            for tracker in self.trackers:
                tracker.images(step, name, image)

    def plot(self) -> Path:
        """Redraw ``curves.png``: loss and KL, learning rate, mIoU against the step."""
        return plot_curves(read_metrics(self.path), self.out / "curves.png")

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def plot_curves(records: list[dict], png: Path) -> Path:
    """Training curves of a run's records as a PNG (written atomically)."""
    fig = curves_figure(records)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(png)
    return png


def curves_figure(records: list[dict]):
    """The figure of ``plot_curves``: loss and KL, learning rate, and mIoU in percent
    (records hold it as a fraction) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("mIoU") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="loss (what is optimised)")
    axes[0].plot(steps, [r["kl"] for r in train], label="KL on the labelled pixels")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot([r["step"] for r in evals], [100 * r["mIoU"] for r in evals], "o-")
    axes[2].set_title("validation mIoU (%)")
    axes[2].set_ylim(0, 100)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
