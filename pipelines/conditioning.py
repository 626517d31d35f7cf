"""What the UNet is conditioned on in every stage and tile: text, micro-conditioning, IP-Adapter images.

Built once per call (``encode``), before the first stage; every stage and tile gets the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Text, micro-conditioning and IP-Adapter embeddings for the UNet; with CFG, the unconditional half
    first (2B rows in every tensor, 2B rows in each entry of ``image_embeds``).

    prompt_embeds: (rows, tokens, cross_attention_dim); text_embeds: (rows, pooled dim);
    time_ids: (rows, 6); timestep_cond: (rows, time_cond_proj_dim) or None (LCM-style UNets);
    image_embeds: one tensor per loaded IP-Adapter, (rows, ...), or None without IP-Adapter input.
    """

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    timestep_cond: torch.Tensor | None
    cfg: bool
    image_embeds: list[torch.Tensor] | None = None

    def half(self, index: int) -> "Conditioning":
        """Rows of the unconditional (0) or conditional (1) half."""
        return self.select((0, self.batch), (index,))

    def select(self, images: tuple[int, int], halves: tuple[int, ...]) -> "Conditioning":
        """Rows of images ``images[0]:images[1]`` in each of ``halves`` (0 unconditional, 1 conditional;
        (0,) without CFG), halves in that order; ``cfg`` says whether both halves are there."""
        rows = [h * self.batch + b for h in halves for b in range(*images)]
        if rows == list(range(self.prompt_embeds.shape[0])):
            return self
        index = torch.tensor(rows, device=self.prompt_embeds.device)

        def pick(t):
            return None if t is None else t[index.to(t.device)]

        image_embeds = None if self.image_embeds is None else [pick(e) for e in self.image_embeds]
        return Conditioning(pick(self.prompt_embeds), pick(self.text_embeds), pick(self.time_ids),
                            pick(self.timestep_cond), len(halves) == 2, image_embeds)

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0] // (2 if self.cfg else 1)

    def added_cond_kwargs(self) -> dict:
        """The UNet's ``added_cond_kwargs``."""
        kwargs = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        if self.image_embeds is not None:
            kwargs["image_embeds"] = self.image_embeds
        return kwargs


def negative_size_conditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                               negative_crops_coords_top_left, negative_target_size):
    """(original size, crop offset, target size) of the unconditional half, or None for the positive ones.

    diffusers' SDXL pipeline uses a negative micro-conditioning only when both negative sizes are given
    (and then the negative crop offset with it). Here any negative argument given applies, the missing
    negative sizes taking the positive ones; when both negative sizes are given the result is diffusers'.
    """
    if negative_original_size is None and negative_target_size is None and tuple(negative_crops_coords_top_left) == (0, 0):
        return None
    return (tuple(negative_original_size or original_size), tuple(negative_crops_coords_top_left),
            tuple(negative_target_size or target_size))


def encode(pipe, *, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, prompt_embeds,
           negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, size_conditioning,
           negative_size_conditioning, ip_adapter_image=None, ip_adapter_image_embeds=None) -> Conditioning:
    """Encode prompts, micro-conditioning and IP-Adapter inputs with ``pipe``'s encoders.

    Follows StableDiffusionXLPipeline.__call__ of diffusers 0.42 (steps 3, 7 and 9: ``encode_prompt``,
    ``_get_add_time_ids``, ``prepare_ip_adapter_image_embeds``, ``get_guidance_scale_embedding``), with
    one difference: the negative micro-conditioning goes to every row of the unconditional half (diffusers
    repeats the [negative, positive] pair, which for a batch above one mixes the halves' time ids).

    ``size_conditioning``: (original_size, crops_coords_top_left, target_size);
    ``negative_size_conditioning``: the same for the unconditional half, or None for the positive one.
    """
    device = pipe._execution_device
    cfg = pipe.do_classifier_free_guidance
    lora_scale = (pipe.cross_attention_kwargs or {}).get("scale")
    prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        lora_scale=lora_scale, clip_skip=pipe.clip_skip,
    )
    rows = prompt_embeds.shape[0]
    projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)

    def time_ids(sizes):
        ids = pipe._get_add_time_ids(*sizes, dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        return ids.repeat(rows, 1)

    add_time_ids = time_ids(size_conditioning)
    if cfg:
        negative_time_ids = add_time_ids if negative_size_conditioning is None else time_ids(negative_size_conditioning)
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        pooled = torch.cat([negative_pooled, pooled])
        add_time_ids = torch.cat([negative_time_ids, add_time_ids])

    image_embeds = None
    if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
        image_embeds = pipe.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                            rows, cfg)

    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        scale = torch.tensor(pipe.guidance_scale - 1).repeat(rows)
        timestep_cond = pipe.get_guidance_scale_embedding(scale, embedding_dim=pipe.unet.config.time_cond_proj_dim)
        timestep_cond = timestep_cond.to(device=device, dtype=prompt_embeds.dtype)
    return Conditioning(prompt_embeds.to(device), pooled.to(device), add_time_ids.to(device), timestep_cond, cfg,
                        image_embeds)
