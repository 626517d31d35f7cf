"""hand_over_grid: the one mechanism that gives (B, N, C) consumers the token grid (H, W)."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from gspn_diffusers.adapter import self_attention_layers
from gspn_diffusers.testing import TINY_TEXT_HIDDEN, tiny_unet_config
from gspn_diffusers.token_grid import hand_over_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


def forward(unet, height, width):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        unet(torch.randn(1, 4, height, width, generator=g), torch.tensor(10),
             encoder_hidden_states=torch.randn(1, 77, 2 * TINY_TEXT_HIDDEN, generator=g),
             added_cond_kwargs=dict(text_embeds=torch.randn(1, TINY_TEXT_HIDDEN, generator=g),
                                    time_ids=torch.zeros(1, 6)))


def test_every_receiver_gets_the_grid_of_its_block_at_every_call(unet):
    layers = self_attention_layers(unet)
    receivers = {layer: SimpleNamespace(grid=None) for layer in layers}
    seen = {layer: [] for layer in layers}
    handles = hand_over_grid(unet, receivers)
    records = [unet.get_submodule(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: seen[layer].append(receivers[layer].grid)) for layer in layers]
    try:
        forward(unet, 16, 24)
        forward(unet, 8, 40)
    finally:
        for handle in handles + records:
            handle.remove()
    down = len(unet.config.block_out_channels) - 1
    for layer in layers:
        # the grid of the latents at this block's level: halved per downsampling before it
        level = int(layer.split(".")[1]) if layer.startswith("down_blocks") else (
            down if layer.startswith("mid_block") else down - int(layer.split(".")[1]))
        assert seen[layer] == [(16 >> level, 24 >> level), (8 >> level, 40 >> level)], layer
    forward(unet, 16, 16)  # hooks removed: the receivers keep the grid of the last hooked call
    assert [receivers[layer].grid for layer in layers] == [seen[layer][-1] for layer in layers]


def test_a_layer_outside_any_transformer_is_refused_and_nothing_installed(unet):
    receivers = {"conv_in": SimpleNamespace(grid=None),
                 self_attention_layers(unet)[0]: SimpleNamespace(grid=None)}
    with pytest.raises(ValueError, match="'conv_in' is not inside a Transformer2DModel"):
        hand_over_grid(unet, receivers)
    assert not any(module._forward_pre_hooks for module in unet.modules())


def test_no_other_module_hooks_transformers_or_sets_a_grid():
    """Mounting, the distillation's activation tap and its layerwise stage all go through hand_over_grid."""
    offenders = []
    for folder in ("gspn_diffusers", "distill", "pipelines"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "token_grid.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if "Transformer2DModel" in line or re.search(r"\.grid = (?!None)", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
