"""Offline SDXL pipelines with random weights for tests, demos and benchmarks.

Nothing here downloads anything: the tokenizers are written from a byte-level vocabulary, every model
gets random weights. ``random_sdxl_components("full", ...)`` builds SDXL base 1.0's architecture from the
configs shipped in ``gspn_diffusers/configs``. The tiny pipeline (``save_tiny_sdxl``) has SDXL's
structure (three UNet levels, no attention at level 0, cross-attention transformers at levels 1 and 2,
text-time conditioning, two text encoders, a VAE with 8x compression and 4 latent channels, SDXL's
Euler scheduler) at a size that makes a 256x256 image in 2 steps in about a second on 2 CPU cores.
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

import torch

TINY_TEXT_HIDDEN = 32
TINY_TIME_EMBED_DIM = 8
TINY_RESOLUTION = 256
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_byte_tokenizer(path: str | Path, pad_token: str = "<|endoftext|>"):
    """Write a ``CLIPTokenizer`` folder over a byte-level vocabulary with no merges; return it loaded."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols] + list(_SPECIAL_TOKENS))}
    if pad_token not in vocab:
        vocab[pad_token] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77, pad_token=pad_token
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def _text_encoder_config(vocab_size: int, bos: int, eos: int, pad: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_TEXT_HIDDEN if projection else 512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def tiny_unet_config() -> dict:
    """UNet2DConditionModel kwargs with SDXL's structure at widths 32/64/64."""
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        norm_num_groups=16,
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_TEXT_HIDDEN + 6 * TINY_TIME_EMBED_DIM,
        use_linear_projection=True,
    )


def tiny_vae_config() -> dict:
    """AutoencoderKL kwargs with SDXL's 8x compression and 4 latent channels at widths 8/16/16/16."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def sdxl_scheduler():
    """SDXL base 1.0's scheduler: Euler, scaled-linear betas, leading timesteps, epsilon prediction."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def save_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny random-weight SDXL pipeline folder at ``path`` and return the path.

    ``StableDiffusionXLPipeline.from_pretrained(path)`` loads it offline; the same seed writes the
    same weights.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scratch = path / "_tokenizer_build"
    tokenizer = write_byte_tokenizer(scratch / "one")
    tokenizer_2 = write_byte_tokenizer(scratch / "two", pad_token="!")
    ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_encoder_config(len(tokenizer), pad=tokenizer.pad_token_id, projection=False, **ids)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(len(tokenizer_2), pad=tokenizer_2.pad_token_id, projection=True, **ids)
    )
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
    )
    pipe.save_pretrained(path)
    for sub in ("one", "two"):
        for f in (scratch / sub).iterdir():
            f.unlink()
        (scratch / sub).rmdir()
    scratch.rmdir()
    return path


def sdxl_config(name: str) -> dict:
    """Constructor kwargs of a full-size SDXL base 1.0 part from ``gspn_diffusers/configs``.

    name: "unet", "vae", "text_encoder" or "text_encoder_2". The file's bookkeeping keys
    (``_class_name``, ``architectures``, ``model_type``) are dropped.
    """
    text = resources.files("gspn_diffusers.configs").joinpath(f"sdxl_{name}.json").read_text()
    dropped = ("architectures", "model_type")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_") and k not in dropped}


def random_sdxl_components(kind: str, device, dtype: torch.dtype, seed: int = 0) -> dict:
    """The components of an SDXL pipeline with random weights, built directly on ``device`` in ``dtype``.

    kind "full": SDXL base 1.0's architecture (a 2.6B-parameter UNet; on a GPU this takes seconds,
    building on the CPU first would take minutes); "tiny": the test-sized one of ``save_tiny_sdxl``.
    Returns the keyword arguments of ``StableDiffusionXLPipeline`` (vae, text_encoder, text_encoder_2,
    tokenizer, tokenizer_2, unet, scheduler). The tokenizers are byte-level CLIP tokenizers written to a
    temporary folder, and the text encoders take their vocabulary size and special token ids. The same
    seed on the same kind of device gives the same weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("full", "tiny"):
        raise ValueError(f"kind must be 'full' or 'tiny', got {kind!r}")
    scratch = tempfile.mkdtemp(prefix="gspn-random-sdxl-")
    tokenizers = (write_byte_tokenizer(f"{scratch}/tokenizer"),
                  write_byte_tokenizer(f"{scratch}/tokenizer_2", pad_token="!"))
    if kind == "full":
        unet_config, vae_config = sdxl_config("unet"), sdxl_config("vae")
        text_configs = []
        for name, tok in zip(("text_encoder", "text_encoder_2"), tokenizers):
            config = sdxl_config(name)
            text_configs.append(CLIPTextConfig(**dict(
                config, vocab_size=max(config["vocab_size"], len(tok)), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
    else:
        unet_config, vae_config = tiny_unet_config(), tiny_vae_config()
        text_configs = [
            _text_encoder_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, projection)
            for tok, projection in zip(tokenizers, (False, True))
        ]

    def build(make):
        with torch.device(device):
            module = make()  # random init on the device itself, in float32
        return torch.nn.Module.to(module, dtype=dtype)

    torch.manual_seed(seed)
    text_encoder = build(lambda: CLIPTextModel(text_configs[0]))
    text_encoder_2 = build(lambda: CLIPTextModelWithProjection(text_configs[1]))
    unet = build(lambda: UNet2DConditionModel(**unet_config))
    vae = build(lambda: AutoencoderKL(**vae_config))
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
                tokenizer_2=tokenizers[1], unet=unet, scheduler=sdxl_scheduler())


def tiny_ip_adapter(unet, image_embed_dim: int = 16, seed: int = 0) -> dict:
    """A random IP-Adapter state dict for ``unet`` (the original IP-Adapter's layout: an image projection
    to 4 tokens and to_k_ip / to_v_ip for every cross-attention), loadable offline with
    ``pipe.load_ip_adapter(state_dict, subfolder=None, weight_name=None, image_encoder_folder=None)``.

    ``image_embed_dim``: the width of the image embeddings it takes (``tiny_image_encoder``'s projection).
    """
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    widths = list(unet.config.block_out_channels)

    def randn(*shape):
        return 0.1 * torch.randn(*shape, generator=generator)

    image_proj = {"proj.weight": randn(4 * cross, image_embed_dim), "proj.bias": randn(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key = {}, 1
    # The numbering and widths of diffusers' UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers:
    # every cross-attention in attn_processors order gets the odd key 1, 3, 5, ...
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            width = widths[-1]
        elif name.startswith("up_blocks"):
            width = widths[::-1][int(name[len("up_blocks.")])]
        else:
            width = widths[int(name[len("down_blocks.")])]
        ip_adapter[f"{key}.to_k_ip.weight"] = randn(width, cross)
        ip_adapter[f"{key}.to_v_ip.weight"] = randn(width, cross)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def tiny_image_encoder(projection_dim: int = 16, image_size: int = 32, seed: int = 0):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) at test size with random weights: the
    ``image_encoder`` and ``feature_extractor`` an SDXL pipeline needs for ``ip_adapter_image``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=projection_dim)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return CLIPVisionModelWithProjection(config).eval(), processor
