"""What the quality benchmark's scripts share: CIFAR-10 loading, the class-conditional pixel UNet, its
noise schedule, the held-out denoising loss and a deterministic sampler.

Images are (N, 3, 32, 32) uint8 on the device; the model sees them as x = u8 / 127.5 - 1. The class
condition is ``encoder_hidden_states`` of length 1: a learned ``nn.Embedding(11, D)`` row, index 10 is
"no class" (classifier-free guidance).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

NUM_CLASSES = 10
UNCONDITIONAL = NUM_CLASSES  # the embedding row of "no class"
TRAIN_TIMESTEPS = 1000

# SDXL's block types (no addition embeddings) at CIFAR scale: self-attention at 32x32 and 16x16, and in the
# 8x8 mid block; cross-attention reads the class embedding. UNet2DConditionModel reads attention_head_dim as
# the number of heads per block (SDXL's (5, 10, 20) are heads of 64 channels): here heads of 32 channels.
TEACHER_HEAD_CHANNELS = 32
TEACHER_WIDTHS = (64, 96, 96)
TEACHER_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=TEACHER_WIDTHS, layers_per_block=1, transformer_layers_per_block=1,
    cross_attention_dim=64, attention_head_dim=tuple(width // TEACHER_HEAD_CHANNELS for width in TEACHER_WIDTHS),
    norm_num_groups=16,
)
TINY_CONFIG = dict(TEACHER_CONFIG, block_out_channels=(16, 16, 32), cross_attention_dim=16,
                   attention_head_dim=(2, 2, 4), norm_num_groups=8)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def decode_split(path: str | Path, count: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a CIFAR-10 JPEG archive (see the data's README) -> (N, 3, 32, 32) uint8, (N,) int64 labels.

    ``count`` picks that many images, a fixed random subset (the archives are sorted by class).
    """
    from PIL import Image

    archive = np.load(path)
    data, offsets, labels = archive["data"], archive["offsets"], archive["labels"]
    total = len(offsets) - 1
    if count is not None and not 0 < count <= total:
        raise ValueError(f"count must be in 1..{total}, got {count}")
    order = np.arange(total) if count is None else np.sort(np.random.default_rng(seed).permutation(total)[:count])
    images = np.stack([
        np.asarray(Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        for i in order
    ])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[order].astype(np.int64))


def subset_archive(source: str | Path, target: str | Path, count: int, seed: int = 0) -> None:
    """Write the JPEG bytes of ``decode_split(source, count, seed)``'s images to a smaller archive."""
    archive = np.load(source)
    data, offsets = archive["data"], archive["offsets"]
    order = np.sort(np.random.default_rng(seed).permutation(len(offsets) - 1)[:count])
    pieces = [data[offsets[i]:offsets[i + 1]] for i in order]
    new_offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    np.savez(target, data=np.concatenate(pieces), offsets=new_offsets, labels=archive["labels"][order],
             classes=archive["classes"])


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ClassConditionedUNet(nn.Module):
    """The UNet and its class embedding; ``forward(x, t, labels)`` -> the UNet's prediction."""

    def __init__(self, config: dict):
        super().__init__()
        self.unet = UNet2DConditionModel(**config)
        self.label_embedding = nn.Embedding(NUM_CLASSES + 1, config["cross_attention_dim"])

    def forward(self, x, timesteps, labels):
        context = self.label_embedding(labels).unsqueeze(1)
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon")


def save_model(model: ClassConditionedUNet, folder: str | Path, config: dict, dtype=torch.float16) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def load_model(folder: str | Path, device) -> ClassConditionedUNet:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = ClassConditionedUNet(config)
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    model.load_state_dict(state)
    return model.to(device)


class EMA:
    """Exponential moving average of a model's float parameters, with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.float() for p in model.parameters()], 1 - decay)

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for param, value in zip(model.parameters(), self.shadow):
                param.copy_(value)


def random_flip(images: torch.Tensor, generator=None) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


@torch.no_grad()
def heldout_loss(model, images: torch.Tensor, labels: torch.Tensor, draws: int = 4, batch: int = 500,
                 seed: int = 1234) -> float:
    """Mean epsilon MSE over the images x ``draws`` (timestep, noise) pairs fixed by ``seed``.

    The same seed gives every model the same noise and timesteps.
    """
    scheduler = noise_scheduler()
    device = images.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        for start in range(0, len(images), batch):
            x0 = to_model_space(images[start:start + batch])
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = torch.randint(0, TRAIN_TIMESTEPS, (len(x0),), generator=generator).to(device)
            xt = scheduler.add_noise(x0, noise, t)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                prediction = model(xt, t, labels[start:start + batch])
            total += (prediction.float() - noise).pow(2).flatten(1).mean(1).sum().item()
            count += len(x0)
    return total / count


@torch.no_grad()
def sample(model, labels: torch.Tensor, seed: int, steps: int = 20, guidance: float = 1.5,
           batch: int = 1000) -> torch.Tensor:
    """DPM-Solver++ (2M, deterministic) with classifier-free guidance -> (N, 3, 32, 32) uint8.

    Sample i starts from noise fixed by (seed, i), so two models given the same seed and labels are
    compared image by image.
    """
    device = labels.device
    out = []
    for start in range(0, len(labels), batch):
        part = labels[start:start + batch]
        generator = torch.Generator(device="cpu").manual_seed(seed + start)
        x = torch.randn((len(part), 3, 32, 32), generator=generator).to(device)
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear",
                                                prediction_type="epsilon", algorithm_type="dpmsolver++",
                                                solver_order=2)
        scheduler.set_timesteps(steps, device=device)
        both = torch.cat([part, torch.full_like(part, UNCONDITIONAL)])
        for t in scheduler.timesteps:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                eps = model(torch.cat([x, x]), t.expand(2 * len(part)), both).float()
            conditional, unconditional = eps.chunk(2)
            x = scheduler.step(unconditional + guidance * (conditional - unconditional), t, x).prev_sample
        out.append(to_uint8(x))
    return torch.cat(out)
