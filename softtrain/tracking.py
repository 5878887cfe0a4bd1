"""Experiment trackers: what a run reports besides ``metrics.jsonl``.

A ``Tracker`` gets the run's options once, scalars as the run goes (``train/loss``,
``val/mIoU``, ``val_iou/<class>``, ...) and, at each evaluation, a few images (colour |
truth | prediction). TensorBoard (``--tensorboard``) and MLflow (``--mlflow URI``) are built
in; any other (Weights & Biases, ...) is a subclass named with ``--tracker
package.module:Class``, constructed with the run folder (before the run is known to
start: open connections in ``start``)::

    class WandbTracker(Tracker):
        def __init__(self, out):
            self.out = out
        def start(self, options, resume_step):
            import wandb
            self.run = wandb.init(dir=str(self.out), name=self.out.name, resume="allow",
                                  config=options, allow_val_change=True)
        def scalars(self, step, values):
            self.run.log(values, step=step)
        def images(self, step, name, image):
            self.run.log({name: wandb.Image(image)}, step=step)
        def close(self):
            self.run.finish()
"""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from softtrain.errors import TrainingError


class Tracker:
    """No-op defaults; override what your tracker records."""

    def start(self, options: dict, resume_step: int | None) -> None:
        """Once: the run's options as flat keys; ``resume_step`` when resuming."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Named numbers at optimiser step ``step``."""

    def images(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 picture at ``step``."""

    def close(self) -> None:
        """The run ended (or stopped): send and flush everything now. Exit handlers do not
        run after it in a torchrun rank (``softtrain.distributed.exit_rank``)."""


class TensorBoardTracker(Tracker):
    """Scalars, images and the options (as hyperparameters and as text) in ``<out>/tb``."""

    def __init__(self, out: Path):
        self.out = out

    def start(self, options: dict, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=resume_step)
        shown = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                 for k, v in options.items()}  # fmt: skip
        self.writer.add_hparams(shown, {}, run_name=".")
        self.writer.add_text("options", "\n".join(f"    {k} = {v!r}" for k, v in options.items()))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, step: int, name: str, image: np.ndarray) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run named after the run folder at tracking URI ``uri`` (``file:./mlruns``
    or a server); the options as parameters, scalars as metrics, images as artifacts. A
    resumed run continues the same MLflow run (its id is kept in ``<out>/mlflow_run_id``)."""

    def __init__(self, out: Path, uri: str):
        self.out, self.uri = out, uri

    def start(self, options: dict, resume_step: int | None) -> None:
        import mlflow

        if urlparse(self.uri).scheme in ("", "file"):  # a folder, as --help offers: MLflow 3
            # refuses it unless this is set (kept for the rest of this process, a user's
            # own "false" respected)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        saved = self.out / "mlflow_run_id"
        run_id = saved.read_text().strip() if resume_step is not None and saved.exists() else None
        try:  # MLflow's many store errors: one line (TrainingError), not a traceback
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment("softtrain")
        except Exception as e:  # noqa: BLE001
            raise TrainingError(
                f"--mlflow {self.uri}: MLflow cannot use it ({_first(e)})"
            ) from None
        try:
            self.run = mlflow.start_run(run_id=run_id, run_name=self.out.name)
        except Exception as e:  # noqa: BLE001
            if run_id is None:
                raise TrainingError(
                    f"--mlflow {self.uri}: MLflow cannot start a run ({_first(e)})"
                ) from None
            raise TrainingError(
                f"--mlflow {self.uri}: the resumed run's MLflow run {run_id} ({saved}) cannot "
                f"be continued ({_first(e)}); delete {saved} to log to a new MLflow run"
            ) from None
        saved.write_text(self.run.info.run_id)
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in options.items()})
        self.mlflow = mlflow

    def scalars(self, step: int, values: dict[str, float]) -> None:
        clean = {k.replace("/", "_"): float(v) for k, v in values.items()}
        self.mlflow.log_metrics(clean, step=step)

    def images(self, step: int, name: str, image: np.ndarray) -> None:
        self.mlflow.log_image(image, f"{name.replace('/', '_')}_step{step:07d}.png")

    def close(self) -> None:
        self.mlflow.end_run()


def _first(e: Exception) -> str:
    """An exception's first line (its type where it has no message)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def picture(colour: np.ndarray, truth: np.ndarray, pred: np.ndarray, palette: np.ndarray):
    """colour | truth | prediction side by side at the colour image's (level) size, (h,
    3w, 3) uint8; ``palette`` (256, 3) uint8 (void black)."""
    h, w = colour.shape[:2]
    rows = (np.arange(h) * truth.shape[0]) // h
    cols = (np.arange(w) * truth.shape[1]) // w
    small = np.ix_(rows, cols)
    return np.concatenate([colour, palette[truth[small]], palette[pred[small]]], axis=1)


def trackers(out: Path, tensorboard: bool, mlflow: str, custom: str) -> list[Tracker]:
    """The trackers a run's options ask for (``--tensorboard``, ``--mlflow``, ``--tracker``)."""
    found: list[Tracker] = []
    if tensorboard:
        found.append(TensorBoardTracker(out))
    if mlflow:
        found.append(MLflowTracker(out, mlflow))
    if custom:
        module, _, name = custom.partition(":")
        try:
            cls = getattr(import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--tracker {custom}: cannot import it ({e})") from None
        found.append(cls(out))
    return found
