"""softtrain: segmentation training on softprep soft-label stores.

The public API (imported on first use, so ``import softtrain`` stays light)::

    from softtrain import CropDataset, soft_label_loss, normalise, Confusion

- Data: ``CropDataset`` (random-scale training crops: ``image`` (3, h, w) uint8,
  ``index``/``prob`` (K, h, w) uint8 top-K soft labels), ``EvalDataset`` (whole images and
  full-resolution labels), ``densify`` (top-K -> (B, C, H, W) float32 probabilities and
  void mass, on the device), ``normalise`` (uint8 -> ImageNet-normalised float32).
- Loss: ``soft_label_loss(logits, index, prob, loss="soft", mc="include")`` -> ``LossOutput``
  (soft CE, its KL, pixels kept); void and multi-class handling as in the paper.
- Metrics: ``Confusion`` (aAcc, mIoU, mAcc, per-class IoU / Acc), ``eval_record``.
- Models: ``MODELS`` and ``build_model(name, num_classes, pretrained=None)``.
- Runs: ``FitConfig``, ``RunSampler``, ``eval_checkpoint``, ``InferenceOptions``,
  ``load_checkpoint``; the loop itself is ``softtrain.fit.fit`` (and
  ``softtrain.evaluate.evaluate``, ``softtrain.predict.predict``; names that are also
  modules are not re-exported).
"""

from importlib import import_module

from softprep import __version__  # one distribution, one version

_EXPORTS = {
    "CropDataset": "softtrain.data",
    "EvalDataset": "softtrain.data",
    "densify": "softtrain.data",
    "normalise": "softtrain.data",
    "soft_label_loss": "softtrain.losses",
    "LossOutput": "softtrain.losses",
    "Confusion": "softtrain.metrics",
    "eval_record": "softtrain.metrics",
    "MODELS": "softtrain.config",
    "build_model": "softtrain.models",
    "FitConfig": "softtrain.config",
    "RunSampler": "softtrain.loader",
    "TrainingError": "softtrain.errors",
    "eval_checkpoint": "softtrain.evaluate",
    "InferenceOptions": "softtrain.evaluate",
    "load_checkpoint": "softtrain.checkpoint",
    "CheckpointError": "softtrain.checkpoint",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'softtrain' has no attribute '{name}'")
