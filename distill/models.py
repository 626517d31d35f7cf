"""The SDXL components the distillation needs: shape check, loading, random full-size build, conditioning.

``check_sdxl_shape`` reads only configs (no weights), so a wrong model is refused before anything is
loaded. ``random_sdxl`` builds SDXL's architecture with random weights directly on the target device
(``"full"``: the base-1.0 configs in ``gspn_diffusers/configs``; ``"tiny"``: the test-sized one), with
byte-level tokenizers: benchmarks and tests need no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspn_diffusers.distill.data import DistillInputError

SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass
class SDXLShape:
    """What the checks found: the VAE's downsampling factor and the latent channels."""

    vae_scale_factor: int
    latent_channels: int


def _require(condition: bool, source: str, reason: str) -> None:
    if not condition:
        raise DistillInputError(f"{source} is not an SDXL-shaped model: {reason}")


def sdxl_shape_from_configs(source: str, unet: dict, vae: dict, text_encoder: dict, text_encoder_2: dict) -> SDXLShape:
    """Check that the four configs fit together as SDXL does; DistillInputError naming ``source`` if not."""
    _require(unet.get("addition_embed_type") == "text_time", source,
             f"the UNet's addition_embed_type is {unet.get('addition_embed_type')!r}, SDXL's is 'text_time'")
    _require(any("CrossAttn" in block for block in unet.get("down_block_types", ())), source,
             "the UNet has no cross-attention blocks (so no attn1 layers to replace)")
    hidden = text_encoder["hidden_size"] + text_encoder_2["hidden_size"]
    _require(unet.get("cross_attention_dim") == hidden, source,
             f"the UNet's cross_attention_dim is {unet.get('cross_attention_dim')}, but the two text encoders' "
             f"hidden sizes add up to {hidden}")
    pooled = text_encoder_2["projection_dim"] + 6 * unet.get("addition_time_embed_dim", 0)
    _require(unet.get("projection_class_embeddings_input_dim") == pooled, source,
             f"the UNet's projection_class_embeddings_input_dim is "
             f"{unet.get('projection_class_embeddings_input_dim')}, SDXL's conditioning gives {pooled} "
             "(text_encoder_2's projection_dim + 6 x addition_time_embed_dim)")
    _require(unet.get("in_channels") == vae.get("latent_channels"), source,
             f"the UNet takes {unet.get('in_channels')} channels, the VAE makes {vae.get('latent_channels')}")
    return SDXLShape(2 ** (len(vae["block_out_channels"]) - 1), vae["latent_channels"])


def check_sdxl_shape(path: str, revision: str | None = None, variant: str | None = None) -> SDXLShape:
    """Read the configs of a diffusers SDXL folder or Hub id and check its shape (no weights loaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    source = f"--pretrained_model_name_or_path {path!r}"
    try:
        configs = dict(
            unet=UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision),
            vae=AutoencoderKL.load_config(path, subfolder="vae", revision=revision),
            text_encoder=CLIPTextConfig.from_pretrained(path, subfolder="text_encoder", revision=revision).to_dict(),
            text_encoder_2=CLIPTextConfig.from_pretrained(
                path, subfolder="text_encoder_2", revision=revision
            ).to_dict(),
        )
    except Exception as error:  # noqa: BLE001 - any missing or unreadable part means: not SDXL-shaped
        raise DistillInputError(
            f"{source} is not an SDXL-shaped model: could not read its configs ({type(error).__name__}: {error}); "
            f"an SDXL pipeline folder has {', '.join(SDXL_SUBFOLDERS)}"
        ) from error
    return sdxl_shape_from_configs(source, **configs)


def load_sdxl(args, device, weight_dtype) -> SDXLComponents:
    """Load the pipeline's parts from ``--pretrained_model_name_or_path``, frozen, on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    options = dict(revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **options)
    tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **options)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **options)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
        path, subfolder="text_encoder_2", variant=variant, **options
    )
    vae_path = args.pretrained_vae_model_name_or_path or path
    vae = AutoencoderKL.from_pretrained(
        vae_path, subfolder=None if args.pretrained_vae_model_name_or_path else "vae", variant=variant, **options
    )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **options)
    from diffusers import EulerDiscreteScheduler

    scheduler_config = dict(EulerDiscreteScheduler.load_config(path, subfolder="scheduler", **options))
    components = SDXLComponents(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config)
    return place(components, device, weight_dtype)


def place(components: SDXLComponents, device, weight_dtype) -> SDXLComponents:
    """Freeze every part and put it on ``device``: UNet and text encoders in ``weight_dtype``, the VAE in
    float32 when its config asks for upcasting (SDXL's VAE overflows in float16)."""
    vae_dtype = torch.float32 if components.vae.config.get("force_upcast", True) else weight_dtype
    for module, dtype in ((components.unet, weight_dtype), (components.text_encoder, weight_dtype),
                          (components.text_encoder_2, weight_dtype), (components.vae, vae_dtype)):
        module.requires_grad_(False).eval()
        torch.nn.Module.to(module, device=device, dtype=dtype)  # not ModelMixin.to: it warns about any dtype
    return components


def random_sdxl(kind: str, device, weight_dtype, seed: int = 0) -> SDXLComponents:
    """SDXL with random weights (``gspn_diffusers.testing.random_sdxl_components``), frozen, on ``device``.

    kind "full": the SDXL base 1.0 architecture (UNet 2.6B parameters); "tiny": the test-sized one.
    The same seed on the same kind of device gives the same weights in every process.
    """
    from gspn_diffusers.testing import random_sdxl_components

    parts = random_sdxl_components(kind, device, weight_dtype, seed)
    components = SDXLComponents(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"],
                                parts["tokenizer"], parts["tokenizer_2"], dict(parts["scheduler"].config))
    return place(components, device, weight_dtype)


# ----------------------------------------------------------------------------------- conditioning


@torch.no_grad()
def encode_prompts(components: SDXLComponents, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: (penultimate hidden states of both encoders concatenated, pooled)."""
    # Follows encode_prompt of diffusers' train_text_to_image_sdxl.py (and StableDiffusionXLPipeline.encode_prompt).
    hidden, pooled = [], None
    for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                               (components.tokenizer_2, components.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output.text_embeds if hasattr(output, "text_embeds") else output[0]
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_sizes, crop_top_lefts, resolution: int, device, dtype) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
    # Follows compute_time_ids of diffusers' train_text_to_image_sdxl.py.
    rows = [list(size) + list(crop) + [resolution, resolution] for size, crop in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, device=device, dtype=dtype)
