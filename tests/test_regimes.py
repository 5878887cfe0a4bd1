"""The one loop and its regimes, the config as the one source of options."""

import pytest
import torch

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softtrain.checkpoint import load_checkpoint
from softtrain.config import REGIMES, FitConfig, declared
from softtrain.fit import fit
from softtrain.losses import LossOutput
from softtrain.supervised import Supervised
from tests.tinynet import TINY


class Toy(Supervised):
    """A regime written outside softtrain: the supervised loss plus a penalty on the mean
    logit, and a step counter kept in the checkpoints."""

    def start(self, model):
        self.steps = 0

    def loss(self, forward, batch, step, micro):
        logits = forward(batch["image"])
        out = super().loss(lambda x, module=None: logits, batch, step, micro)
        return LossOutput(out.loss + 0.01 * logits.float().mean() ** 2, out.kl, out.kept)

    def after_step(self, model, step):
        self.steps += 1

    def state(self):
        return {"toy_steps": self.steps}

    def restore(self, ckpt):
        self.steps = ckpt["toy_steps"]


@pytest.mark.slow
def test_a_new_regime_plugs_in_with_one_registration_line(samples, tmp_path, monkeypatch):
    url = str(tmp_path / "cs.zarr")
    build(load_manifest("cityscapes"), samples["cityscapes"], url, BuildOptions(scales=(0.125,)))
    monkeypatch.setitem(REGIMES, "toy", f"{__name__}:Toy")  # the one line
    options = dict(
        store=url, out=str(tmp_path / "run"), model=TINY, crop="32x64",
        batch_size=2, workers=0, device="cpu", regime="toy",
    )  # fmt: skip
    fit(FitConfig.of(iters=2, **options))
    assert load_checkpoint(tmp_path / "run/last.pt")["toy_steps"] == 2
    fit(FitConfig.of(iters=3, **options), resume=True)  # its state comes back
    ckpt = load_checkpoint(tmp_path / "run/last.pt")
    assert ckpt["toy_steps"] == 3 and ckpt["config"]["regime"] == "toy"
    assert FitConfig.from_toml(tmp_path / "run/config.toml").regime == "toy"


def test_config_toml_has_a_table_per_section_and_flat_files_still_load(tmp_path):
    cfg = FitConfig.of(store="s.zarr", batch_size=3, weak_lambda=2.5, labeled="1/8", bf16=True)
    text = cfg.to_toml()
    assert "[optim]\n" in text and "[weak]\n" in text and "lam = 2.5" in text
    (tmp_path / "nested.toml").write_text(text)
    assert FitConfig.from_toml(tmp_path / "nested.toml") == cfg
    flat = "\n".join(f"{k} = {v}" for k, v in [  # config.toml as versions before wrote it
        ("store", '"s.zarr"'), ("batch_size", 3), ("weak_lambda", 2.5), ("labeled", '"1/8"'),
        ("bf16", "true"), ("semi_threshold", 0.95),
    ])  # fmt: skip
    (tmp_path / "flat.toml").write_text(flat)
    again = FitConfig.from_toml(tmp_path / "flat.toml")
    assert again == cfg and again.regime == "teacher-student"
    assert again.flat()["weak_lambda"] == 2.5 and again.weak.lam == 2.5
    assert len(again.flat()) == len(declared())


def test_ce_hard_applies_before_and_after_weak_start(samples, tmp_path):
    from softtrain.data import CropDataset
    from softtrain.losses import soft_label_loss
    from softtrain.weak_losses import affinities, potts, training_loss

    url = str(tmp_path / "w.zarr")
    build(
        load_manifest("cityscapes"), samples["cityscapes"], url,
        BuildOptions(scales=(0.125,), weak="blocks:0.3:32"),
    )  # fmt: skip
    batch = next(
        iter(torch.utils.data.DataLoader(CropDataset(url, (32, 64), seed=0), batch_size=2))
    )
    logits = torch.randn(2, 19, 32, 64)
    cfg = FitConfig.of(store=url, loss="ce-hard", weak_loss="potts", weak_start=5)
    loss = training_loss(cfg)
    args = (logits, batch["index"], batch["prob"])
    hard = soft_label_loss(*args, "ce-hard").loss
    assert loss(*args, batch["image"], 4).loss == hard
    extra = 10.0 * potts(logits.softmax(1), affinities(batch["image"], 3.0), "collision-divergence")
    torch.testing.assert_close(loss(*args, batch["image"], 5).loss, hard + extra)
