"""gspn_diffusers.testing writes an SDXL pipeline folder that diffusers loads offline."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from gspn_diffusers.testing import save_tiny_sdxl


def test_loads_and_generates(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a lighthouse at dawn", num_inference_steps=2, height=256, width=256,
               generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (256, 256, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_has_sdxl_structure(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.config.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.config.cross_attention_dim == hidden
    assert unet.config.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    self_attention = [n for n, _ in unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert self_attention and all(not n.startswith("down_blocks.0") for n in self_attention)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_same_seed_same_weights(tmp_path):
    a = save_tiny_sdxl(tmp_path / "a", seed=3)
    b = save_tiny_sdxl(tmp_path / "b", seed=3)
    assert (a / "unet/diffusion_pytorch_model.safetensors").read_bytes() == (
        b / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads((a / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
