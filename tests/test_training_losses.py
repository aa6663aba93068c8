"""The losses: scale of the terms, LPIPS (random backbone, VGG file loading), hinge GAN, the adaptive weight,
the discriminator's start step, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from cmvae import CrossModalVAE
from cmvae.training.config import config_from_dict
from cmvae.training.losses import (LastLayerTap, LossWeights, LPIPSWeightsMissing, PatchDiscriminator,
                                   ReconstructionLoss, adaptive_weight, hinge_discriminator_loss,
                                   hinge_generator_loss, lpips_vgg)
from cmvae.training.trainer import Trainer
from media import encode_file, moving_pattern
from test_training_run import SMALL, small_run

# A small network with the structure of the presets: one downsample, 32 and 64 channels.


def small_model(**changes) -> CrossModalVAE:
    torch.manual_seed(0)
    return CrossModalVAE.from_preset("tiny", **{**SMALL, **changes})


def test_reconstruction_terms_are_sums_per_frame():
    target = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    reconstruction = target + 0.1 * torch.randn_like(target)
    kl = torch.tensor([3.0, 5.0])
    terms = ReconstructionLoss(LossWeights(l1=1.0, lpips=0.0, kl=1e-6), None)(target, reconstruction, kl)
    per_frame_sum = (target - reconstruction).abs().sum() / (2 * 4)  # sum over C, H, W; mean over the 8 frames
    torch.testing.assert_close(terms["nll"], per_frame_sum)
    torch.testing.assert_close(terms["total"], per_frame_sum + 1e-6 * 4.0)
    torch.testing.assert_close(terms["l1"], (target - reconstruction).abs().mean())


def test_lpips_with_a_random_backbone_runs_and_passes_gradients():
    perceptual = lpips_vgg(random_backbone=True)
    assert not any(p.requires_grad for p in perceptual.parameters())
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.5 * torch.randn_like(a)).clamp(-1, 1).requires_grad_()
    distance = perceptual(b, a)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    assert perceptual(a, a).abs().max() < 1e-6
    distance.sum().backward()
    assert b.grad.abs().sum() > 0
    loss = ReconstructionLoss(LossWeights(lpips=1.0), perceptual)
    terms = loss(a[:, :, None], b.detach()[:, :, None], torch.zeros(2))
    assert terms["lpips"] > 0


def test_lpips_loads_a_torchvision_vgg16_file_into_its_backbone(tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(1)
    state = vgg16(weights=None).state_dict()
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    perceptual = lpips_vgg(path)
    backbone = dict(perceptual.net.named_parameters())
    torch.testing.assert_close(backbone["slice1.0.weight"], state["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(backbone["slice5.28.bias"], state["features.28.bias"], rtol=0, atol=0)
    torch.save({"features.0.weight": state["features.0.weight"]}, tmp_path / "other.pth")
    with pytest.raises(LPIPSWeightsMissing, match="not torchvision's VGG16"):
        lpips_vgg(tmp_path / "other.pth")


def test_missing_vgg_weights_stop_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LPIPSWeightsMissing, match="vgg16-397923af.pth.*loss.lpips=0"):
        lpips_vgg()


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # real: relu(1 - x) = [0, 1] -> 0.5; fake: relu(1 + x) = [0, 1.5] -> 0.75; half their sum
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.625)
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)


def test_patch_discriminators_on_clips_and_images():
    video = PatchDiscriminator(3)
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in video.modules()) == 3
    assert video.layers[0].out_channels == 64
    # time and space halve in the first three layers: 16 frames -> 2; 64 px -> 8 -> 7 -> 6 (4x4 kernels, stride 1)
    assert video(torch.randn(2, 3, 16, 64, 64)).shape == (2, 1, 2, 6, 6)
    assert video(torch.randn(2, 3, 4, 32, 32)).shape[2] >= 1  # a 4-frame clip keeps a frame
    image = PatchDiscriminator(2)
    assert image(torch.randn(3, 3, 1, 32, 32)).shape == (3, 1, 2, 2)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_decoders_last_layer():
    model = small_model()
    discriminator = PatchDiscriminator(3)
    criterion = ReconstructionLoss(LossWeights(lpips=0.0), None)
    tap = LastLayerTap(model.decoder.conv_out)
    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    out = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    nll = criterion(x, out.sample, out.latent_dist.kl())["nll"]
    g_loss = hinge_generator_loss(discriminator(out.sample))
    from_tap = adaptive_weight(tap.weight_grad(nll), tap.weight_grad(g_loss))

    weight = model.decoder.conv_out.weight
    (nll_grad,) = torch.autograd.grad(nll, weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, weight, retain_graph=True)
    expected = nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(from_tap, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(tap.weight_grad(nll), nll_grad, rtol=1e-4, atol=1e-6)
    assert 1e-3 < expected.item() < 1e4  # a real ratio, not a clamp bound


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for k in range(3):
        encode_file(folder / f"clip{k}.mp4", moving_pattern(24, 40, 40, seed=k))
    return folder


def test_discriminator_is_off_before_its_start_step_and_on_after(clips, tmp_path):
    trainer = Trainer(config_from_dict(small_run(clips, tmp_path, loss={"lpips": 0.0, "disc_start": 2})))
    from cmvae.training.data import make_loader

    batches = iter(make_loader(trainer.dataset, 0, 0, 2))
    before = {k: v.clone() for k, v in trainer.discriminators.state_dict().items()}
    steps = [trainer.train_step(batches) for _ in range(2)]
    assert all(m["loss/disc"] == 0.0 and "loss/g" not in m for m in steps)
    assert all(torch.equal(before[k], v) for k, v in trainer.discriminators.state_dict().items())
    after = trainer.train_step(batches)  # step index 2: the GAN is on
    assert after["loss/disc"] > 0.0 and "loss/g" in after and after["loss/gan_weight"] > 0.0
    changed = trainer.discriminators.state_dict()["video.layers.0.weight"]
    assert not torch.equal(before["video.layers.0.weight"], changed)
    trainer.close()


def test_gradient_checkpointing_gives_the_same_gradients(clips, tmp_path):
    from cmvae.training.data import make_loader

    grads = []
    for checkpointing in (False, True):
        run = small_run(clips, tmp_path / str(checkpointing), model={"gradient_checkpointing": checkpointing},
                        loss={"lpips": 1.0, "lpips_vgg_weights": "random", "disc_start": 0})
        trainer = Trainer(config_from_dict(run))
        trainer.train_step(iter(make_loader(trainer.dataset, 0, 0, 2)))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.close()
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
