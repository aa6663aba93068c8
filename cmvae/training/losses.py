"""The paper's losses: L1 + LPIPS (VGG) + KL on the final posterior + hinge GAN with PatchGAN discriminators.

Scale, as in the latent-diffusion autoencoder loss the authors built on: the reconstruction terms are
summed over the pixels of a frame and averaged over frames; the KL is summed over the latent of a clip
(or image) and averaged over the batch. The KL weight 1e-6 is relative to those sums.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, LPIPS's backbone


class LPIPSWeightsMissing(ValueError):
    """LPIPS is asked for but the VGG16 backbone weights are not on this machine."""


# ---- LPIPS ----------------------------------------------------------------------------------


def find_vgg16_weights(path: str | os.PathLike | None = None) -> Path:
    """The VGG16 ImageNet weights LPIPS needs: `path`, else torchvision's file in the torch hub cache."""
    candidates = [Path(path)] if path else [Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = candidates[0]
    raise LPIPSWeightsMissing(
        f"LPIPS needs torchvision's VGG16 ImageNet weights ({VGG16_FILE}) and they are not at {where}. "
        "Copy the file there (it comes from https://download.pytorch.org/models/" + VGG16_FILE + "), "
        "point loss.lpips_vgg_weights at it, or set loss.lpips=0 to train without LPIPS"
    )


def lpips_vgg(vgg_weights: str | os.PathLike | None = None, random_backbone: bool = False) -> nn.Module:
    """LPIPS with the VGG backbone and the package's calibrated linear layers, frozen, in eval mode.

    The backbone is built without weights (so nothing is downloaded) and then loaded from the VGG16
    file; `random_backbone` keeps it random (for tests: the loss runs, its values mean nothing).
    """
    import lpips

    path = None if random_backbone else find_vgg16_weights(vgg_weights)
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        _load_vgg_backbone(model.net, torch.load(path, map_location="cpu", weights_only=True), path)
    return model.eval().requires_grad_(False)


def _load_vgg_backbone(backbone: nn.Module, state: dict, path: Path) -> None:
    """torchvision names the convs `features.N.*`; LPIPS keeps the same layer N in its slices."""
    slices = {}
    for slice_name, block in backbone.named_children():
        for layer_name, _ in block.named_children():
            slices[layer_name] = slice_name
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in slices:
            renamed[f"{slices[parts[1]]}.{parts[1]}.{parts[2]}"] = tensor
    expected = set(backbone.state_dict())
    if set(renamed) != expected:
        raise LPIPSWeightsMissing(f"{path} is not torchvision's VGG16: its convolutions do not match LPIPS's backbone")
    backbone.load_state_dict(renamed)


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


# ---- discriminators -------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convolutions with BatchNorm and LeakyReLU, one logit per patch.

    `dims=3` is the video discriminator: kernels (3, 4, 4), halving time along with height and width
    in the strided layers (time padded by 1, so short clips keep at least one frame). `dims=2` is the
    image discriminator; it takes (B, C, 1, H, W) image batches too.
    """

    def __init__(self, dims: int, in_channels: int = 3, filters: int = 64, layers: int = 3):
        super().__init__()
        self.dims = dims
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        kernel = (3, 4, 4) if dims == 3 else 4
        modules: list[nn.Module] = [conv(in_channels, filters, kernel, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = filters
        for n in range(1, layers + 1):
            out = filters * min(2**n, 8)
            stride = 2 if n < layers else 1
            modules += [conv(width, out, kernel, stride=stride, padding=1, bias=False), norm(out),
                        nn.LeakyReLU(0.2, True)]
            width = out
        modules.append(conv(width, 1, kernel, stride=1, padding=1))
        self.layers = nn.Sequential(*modules)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 2 and x.ndim == 5:
            x = frames_of(x)
        return self.layers(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


# ---- the adaptive GAN weight ----------------------------------------------------------------


class LastLayerTap:
    """Keeps the input and output of a convolution's latest call, to get the gradient of any loss at its
    weight from the activations alone: this works however the model is wrapped (DDP, FSDP, checkpointing)."""

    def __init__(self, conv: nn.Conv3d):
        self.conv = conv
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handle = conv.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self.input, self.output = inputs[0], output

    def weight_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """d loss / d conv.weight, in float32; the graph is kept for the real backward pass."""
        if self.output is None:
            raise RuntimeError("the decoder's last layer has not run with gradients since the tap was set")
        (grad_output,) = torch.autograd.grad(loss, self.output, retain_graph=True)
        conv = self.conv
        return torch.nn.grad.conv3d_weight(self.input.detach().float(), conv.weight.shape, grad_output.float(),
                                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                           groups=conv.groups)

    def clear(self) -> None:
        self.input = self.output = None

    def remove(self) -> None:
        self._handle.remove()
        self.clear()


def adaptive_weight(nll_grad: torch.Tensor, gan_grad: torch.Tensor) -> torch.Tensor:
    """|grad nll| / (|grad gan| + 1e-4), clamped to [0, 1e4]: the GAN term scaled to the reconstruction's pull."""
    return (nll_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ---- the generator objective ----------------------------------------------------------------


@dataclass
class LossWeights:
    l1: float = 1.0
    lpips: float = 1.0
    kl: float = 1e-6
    disc: float = 0.5
    adaptive: bool = True


class ReconstructionLoss(nn.Module):
    """The terms of the autoencoder's objective except the GAN term; returns a dict of tensors."""

    def __init__(self, weights: LossWeights, perceptual: nn.Module | None):
        super().__init__()
        if weights.lpips and perceptual is None:
            raise ValueError("an LPIPS weight is set but no LPIPS network was given")
        self.weights = weights
        self.perceptual = perceptual

    def forward(self, target: torch.Tensor, reconstruction: torch.Tensor, kl: torch.Tensor) -> dict[str, torch.Tensor]:
        target_frames, recon_frames = frames_of(target.float()), frames_of(reconstruction.float())
        pixels_per_frame = target_frames[0].numel()
        l1 = (target_frames - recon_frames).abs().mean()
        terms = {"l1": l1, "kl": kl.float().mean()}
        nll = self.weights.l1 * l1 * pixels_per_frame
        if self.weights.lpips:
            perceptual = self.perceptual(recon_frames.to(reconstruction.dtype), target_frames.to(reconstruction.dtype))
            terms["lpips"] = perceptual.float().mean()
            nll = nll + self.weights.lpips * terms["lpips"] * pixels_per_frame
        terms["nll"] = nll
        terms["total"] = nll + self.weights.kl * terms["kl"]
        return terms
