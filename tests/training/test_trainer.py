"""The trainer: each phase updates exactly its networks, ``frozen`` changes nothing, the
MSE falls, free-form masks are the holes it trains on."""

import numpy as np
import torch
from torch import nn

from glcic_fast.nn.discriminator import ContextDiscriminator
from glcic_fast.training.data import ImageFolder, crop_squares, hole_mask
from glcic_fast.training.trainer import Trainer, frozen


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before, net):
    after = net.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _batch(ds, keys):
    from torch.utils.data import default_collate

    return default_collate([ds[k] for k in keys])


def test_each_phase_updates_exactly_its_networks(photos, tiny_config, tmp_path):
    cfg = tiny_config(photos, tmp_path / "run", phase_steps=(1, 1, 1))
    ds = ImageFolder(photos, cfg.augmentation(), cfg.seed)
    trainer = Trainer(cfg, [0.5, 0.45, 0.4])
    batch = _batch(ds, [(0, 0), (0, 3)])
    # A conv's bias right before BatchNorm has a zero gradient in exact arithmetic (BN
    # subtracts the mean), so it may or may not move; everything else must.
    def must_move(net):
        return {k for k in net.state_dict() if not (k.endswith(".bias") and k.split(".")[-2].startswith(
            ("conv", "deconv")) and k.split(".")[-2] not in ("conv17",))}

    c_must, d_must = must_move(trainer.completion), must_move(trainer.discriminator)
    assert "bn3.running_var" in c_must and "conv17.bias" in c_must and "model_gd.linear6.bias" in d_must
    for phase, c_moves, d_moves in (("completion", True, False), ("discriminator", False, True),
                                    ("joint", True, True)):
        assert trainer.phase == phase
        c0, d0 = _snapshot(trainer.completion), _snapshot(trainer.discriminator)
        metrics = trainer.train_step(batch)
        assert all(torch.isfinite(v) for v in metrics.values()), metrics
        c_changed, d_changed = _changed(c0, trainer.completion), _changed(d0, trainer.discriminator)
        if c_moves:  # parameters and BatchNorm statistics
            assert c_must <= c_changed, c_must - c_changed
        else:
            assert not c_changed, c_changed
        if d_moves:
            assert d_must <= d_changed, d_must - d_changed
        else:
            assert not d_changed, d_changed
    assert set(metrics) == {"mse", "d_loss", "d_real", "d_fake", "adv_loss"}


def test_frozen_changes_nothing_and_restores():
    d = ContextDiscriminator(16, 32, channels=(8, 16, 16, 16, 16)).train()
    before = _snapshot(d)
    with frozen(d):
        assert not any(p.requires_grad for p in d.parameters())
        d(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32))
    assert not _changed(before, d)
    assert all(p.requires_grad for p in d.parameters())
    assert all(m.track_running_stats for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_mse_falls_on_a_fixed_batch(photos, tiny_config, tmp_path):
    cfg = tiny_config(photos, tmp_path / "run", phase_steps=(10, 0, 0), batch_size=4)
    ds = ImageFolder(photos, cfg.augmentation(), cfg.seed)
    trainer = Trainer(cfg, [0.5, 0.45, 0.4])
    batch = _batch(ds, [(0, i) for i in range(4)])
    losses = [trainer.train_step(batch)["mse"].item() for _ in range(10)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_free_form_masks_reach_the_mse_and_the_discriminator(photos, tiny_config, tmp_path):
    """A batch's free-form mask, not its bounding box, is the hole the MSE measures and
    the completed image D sees is built with; D's local patch of it is the batch's."""
    import copy

    cfg = tiny_config(photos, tmp_path / "run", phase_steps=(1, 1, 0), holes="free")
    ds = ImageFolder(photos, cfg.augmentation(), cfg.seed)
    trainer = Trainer(cfg, [0.5, 0.45, 0.4])
    batch = _batch(ds, [(0, 1), (0, 4)])
    x, mask, fake_at, _ = trainer.prepare_batch(batch)
    assert torch.equal(mask, batch["mask"].float())
    box = hole_mask(batch["hole"], cfg.image_size)
    assert (box >= mask).all() and (box > mask).any()  # the mask is inside its box, and smaller

    def masked_mse(net, hole):
        out = copy.deepcopy(net)(net.prepare_input(x, hole))
        return (((out - x) * hole) ** 2).sum() / (hole.sum() * 3)

    expected, with_box = masked_mse(trainer.completion, mask), masked_mse(trainer.completion, box)
    assert not torch.isclose(expected, with_box)
    torch.testing.assert_close(trainer.train_step(batch)["mse"], expected)

    seen = []
    hook = trainer.discriminator.register_forward_pre_hook(lambda _m, args: seen.append(args))
    trainer.train_step(batch)  # the discriminator phase: D on the real, then the completed batch
    hook.remove()
    fake_local, fake_global = seen[1]
    outside = (1 - mask).bool().expand_as(x)
    assert torch.equal(fake_global[outside], x[outside])  # the bounding box's pixels outside the mask too
    assert not torch.equal(fake_global, x)
    assert torch.equal(fake_local, crop_squares(fake_global, fake_at, cfg.local_size))
