"""``GSPNStableDiffusionXLPipeline``: SDXL with GSPN-2 self-attention, progressive 4K-16K generation.

The call follows a ``Plan`` (planning.py) decided before any work: a base stage, then upscale stages
that upsample the previous latent, re-noise it to the stage's strength and denoise it, each running
the UNet on the whole latent or on blended tiles (tiling.py); the VAE decodes in tiles that share
whole-image statistics (vae_tiling.py).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from . import arguments, distributed
from .conditioning import Conditioning, encode, negative_size_conditioning
from .cuda_graphs import GraphedCalls, eager_reason, has_offload_hooks
from .memory import MemoryModel, available_bytes, resident_bytes
from .planning import DEFAULT_NUM_INFERENCE_STEPS, Plan, StagePlan, Unit, VaePlan, make_plan, shrink_stage
from .schedule import custom_schedule_steps, cut_at_denoising_end, set_schedule
from .vae_codec import check_vae
from .vae_codec import decode as vae_decode
from .vae_codec import encode as vae_encode
from .vae_tiling import TileSpread

logger = logging.getLogger(__name__)

UPSAMPLE_MODES = ("latent", "pixel")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GSPNPipelineOutput(StableDiffusionXLPipelineOutput):
    """``images`` as the SDXL pipeline gives them, plus the ``plan`` followed and ``timings``: one dict
    per stage (index, size, attention, tiles actually used, seconds, peak bytes, attempts) and one for
    the decode."""

    plan: Plan | None = None
    timings: list[dict] = field(default_factory=list)



class GSPNStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    """SDXL text-to-image with an optional ``gspn`` component (a ``GSPNAdapter``, mounted on the UNet)
    and progressive generation above the base resolution with UNet and VAE tiling.

    ``from_pretrained(sdxl_folder_or_hub_id, gspn=GSPNAdapter.from_pretrained(...))`` loads a stock
    SDXL checkpoint with GSPN; ``save_pretrained`` writes the adapter as the ``gspn`` subfolder (the
    UNet is saved without it) and ``from_pretrained`` of that folder mounts it again.

    ``pipe.cuda_graphs`` (default True): UNet calls on CUDA of latents up to 256x256 (images up to 2048^2),
    whose host enqueue bounds them, are replayed from CUDA graphs, captured at the first call of each
    shape in a stage and released at its end (``cuda_graphs.py``); calls with ``cross_attention_kwargs``
    or IP-Adapter embeddings, and UNets with offload hooks, run eagerly. False runs every call eagerly.
    """

    _optional_components = StableDiffusionXLPipeline._optional_components + ["gspn"]

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        gspn=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(gspn=gspn)
        if gspn is not None:
            gspn.mount(unet)
            gspn.fuse_projections()  # generation needs no gradients: one GEMM for up and to_out[0]
        self.stage_index: int | None = None
        self.num_stages: int | None = None
        self._custom_schedule: dict = {}
        self._denoising_end = None
        self.cuda_graphs = True
        self._graphed_unet: GraphedCalls | None = None

    # ----------------------------------------------------------------------------------- save / load

    def save_pretrained(self, *args, **kwargs):
        """As diffusers' ``save_pretrained``; the UNet is written without the mounted GSPN processors."""
        with self._gspn_unmounted():
            return super().save_pretrained(*args, **kwargs)

    def load_ip_adapter(self, *args, **kwargs):
        """As diffusers' ``load_ip_adapter``; a mounted GSPN adapter stays mounted (diffusers rebuilds every
        attention processor of the UNet, which would drop GSPN's ``attn1`` processors)."""
        with self._gspn_unmounted():
            return super().load_ip_adapter(*args, **kwargs)

    def unload_ip_adapter(self):
        """As diffusers' ``unload_ip_adapter``; a mounted GSPN adapter stays mounted."""
        with self._gspn_unmounted():
            return super().unload_ip_adapter()

    def _gspn_mounted(self) -> bool:
        gspn = getattr(self, "gspn", None)
        return gspn is not None and gspn.is_mounted_on(self.unet)

    @contextmanager
    def _gspn_unmounted(self):
        """The block runs with the UNet's own processors; a mounted adapter is mounted again after it,
        as it was (options, fused projections), also when the block raises."""
        if not self._gspn_mounted():
            yield
            return
        with self.gspn.unmounted(self.unet):
            yield

    # ------------------------------------------------------------------------------------- planning

    @property
    def base_size(self) -> int:
        """Pixels a side of the base resolution: the UNet's sample size times the VAE factor."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def _vae_compute_dtype(self) -> torch.dtype:
        """The VAE's dtype, except float16 with ``force_upcast`` (SDXL's VAE overflows in float16):
        bfloat16 on a CUDA GPU that supports it, float32 elsewhere."""
        dtype = self.vae.dtype
        if dtype == torch.float16 and self.vae.config.force_upcast:
            device = self._execution_device
            if device.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float32
        return dtype

    def plan(
        self,
        height: int | None = None,
        width: int | None = None,
        *,
        batch_size: int = 1,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 5.0,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        strength=None,
        stage_steps=None,
        upsample_guidance=None,
        upsample_mode: str = "latent",
        tile_size: int | None = None,
        vae_tile_size: int | None = None,
        memory_budget: int | None = None,
        num_processes: int | None = None,
        stage_attention: str | list[str] | None = None,
    ) -> Plan:
        """The plan a call with these arguments would follow; ValueError if it cannot run.

        ``memory_budget``: bytes of working memory beyond what is resident now, per process; None
        takes 90% of the free memory of the execution device (CUDA: free plus cached-unused; CPU:
        available RAM). ``num_processes``: processes to spread the work over; None: the world size of
        torch.distributed's process group (1 without one); in a group every process calls ``plan`` (they
        agree on the least free memory). See ``__call__`` for the other arguments.
        """
        world = distributed.process()[1]
        if num_processes is None:
            num_processes = world
        elif world > 1 and num_processes != world:
            raise ValueError(f"num_processes is {num_processes} but this process group has {world} processes; "
                             "a plan runs on its own number of processes or on one")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}; got {upsample_mode!r}")
        device = self._execution_device
        modules = [m for m in self.components.values() if isinstance(m, nn.Module)]
        # Every process must make the same plan: the least free memory and the most resident bytes.
        resident = distributed.agree(resident_bytes(modules, device), device, "max")
        memory = MemoryModel.for_models(self.unet, self.vae, self.unet.dtype, self._vae_compute_dtype(), resident)
        if memory_budget is None:
            memory_budget = distributed.agree(available_bytes(device), device, "min")
        return make_plan(
            height=arguments.optional_size("height", height, self.base_size),
            width=arguments.optional_size("width", width, self.base_size),
            base_size=self.base_size,
            vae_scale_factor=self.vae_scale_factor,
            memory=memory,
            memory_budget=int(memory_budget),
            batch=batch_size * arguments.positive_int("num_images_per_prompt", num_images_per_prompt),
            cfg=guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None,
            num_inference_steps=num_inference_steps,
            strength=strength,
            stage_steps=stage_steps,
            upsample_guidance=upsample_guidance,
            upsample_mode=upsample_mode,
            tile_size=tile_size,
            vae_tile_size=vae_tile_size,
            num_processes=num_processes,
            stage_attention=stage_attention,
            gspn_available=self._gspn_mounted(),
        )

    # ------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        *,
        strength: float | list[float] | None = None,
        stage_steps: int | list[int] | None = None,
        upsample_guidance: float | list[float] | None = None,
        upsample_mode: str = "latent",
        tile_size: int | None = None,
        vae_tile_size: int | None = None,
        memory_budget: int | None = None,
        num_processes: int | None = None,
        stage_attention: str | list[str] | None = None,
    ):
        """Generate images of ``height x width`` (default: the base resolution), progressively above it.

        The arguments of ``StableDiffusionXLPipeline.__call__`` come first, in its order, and mean what they
        mean there; at or below the base size with no adapter mounted, a call gives what
        ``StableDiffusionXLPipeline`` gives for the same arguments. What they do above the base size:

        - ``num_inference_steps``: the base stage's steps, and the schedule upscale stages take the tail
          of (a stage of strength s runs its last int(num_inference_steps * s) steps). Default 30 (the
          SDXL pipeline's is 50).
        - ``timesteps`` / ``sigmas``: a schedule given instead (e.g. Align-Your-Steps, LCM's): the base stage
          runs all of it, an upscale stage of strength s its last int(n * s) steps (img2img's rule); not
          with ``stage_steps``.
        - ``denoising_end``: the fraction of the noise levels the call denoises, the rest left to a refiner
          (``StableDiffusionXLImg2ImgPipeline(..., denoising_start=denoising_end)`` on the returned
          latents, ``output_type="latent"``). With upscale stages it cuts the last stage, so the refiner
          works on the full-size latent.
        - ``original_size``, ``crops_coords_top_left``, ``target_size`` and their ``negative_`` forms:
          every stage and tile gets the base stage's micro-conditioning (default: the base stage's size;
          SDXL never saw 4K-16K sizes there). A ``negative_`` argument given alone applies (diffusers'
          pipeline uses them only when both negative sizes are given).
        - ``ip_adapter_image`` / ``ip_adapter_image_embeds`` (with ``pipe.load_ip_adapter``): every stage and
          tile. Masks (``cross_attention_kwargs={"ip_adapter_masks": ...}``) need stages that run whole.
        - ``latents``: the base stage's initial noise, shape (batch, 4, base height / 8, base width / 8).
        - ``callback_on_step_end(pipe, step, timestep, callback_kwargs)``: called after every step of
          every stage; ``step`` counts within the stage, ``pipe.stage_index`` says which stage.

        Keyword-only arguments of this pipeline:

        - ``strength``: re-noising strength of the upscale stages, one number or one per upscale stage;
          default 0.5, 0.45, 0.4, 0.35 (then 0.3) for the 1st, 2nd, ... x2 stage.
        - ``stage_steps``: steps of every stage (an int) or of each stage (a list, base first); overrides
          the rule above.
        - ``upsample_guidance``: in [0, 1], one number or one per upscale stage (default 0.5). At step
          i of n of a stage, the latent is pulled towards the upsampled previous latent noised to the
          current timestep with weight ``upsample_guidance * (1 + cos(pi * i / n)) / 2``: the stage
          keeps the composition of the smaller image early and adds detail freely late. 0 disables.
        - ``upsample_mode``: "latent" (bicubic on the latent, default, cheap) or "pixel" (decode, resize
          the image, encode again; the VAE runs tiled both ways).
        - ``tile_size``: pixels of the UNet's square tiles (None: whole latent when it fits, otherwise
          the largest tiles the memory allows). ``vae_tile_size``: pixels of the VAE's tiles (a VAE that
          is not an AutoencoderKL tiles its own way, with its ``enable_tiling``, or refuses a plan that
          needs tiles).
        - ``memory_budget``: bytes the call may use beyond what is resident (see ``plan``).
        - ``num_processes``: processes the plan spreads its work over (default: torch.distributed's
          world size, 1 without a process group). Under ``accelerate launch`` / ``torchrun`` every
          process makes the same call on its own device and gets the same images; a single process
          can run a plan made for N (the same result up to float rounding). See docs/multigpu.md.
        - ``stage_attention``: the self-attention of each stage: None (default) runs the UNet's own softmax
          attention in the base stage (the resolution the UNet was trained at, where softmax is also the
          cheaper one) and the mounted GSPN adapter above; "softmax" or "gspn" for every stage, or a list
          of one per stage. Without an adapter every stage is softmax. The plan and the timings say which
          ran where.

        Every argument is checked before any work; bad values raise ValueError naming the argument.
        Returns ``GSPNPipelineOutput`` (``images``, ``plan``, ``timings``) or ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = arguments.optional_size("height", height, self.base_size)
        width = arguments.optional_size("width", width, self.base_size)
        num_images_per_prompt = arguments.positive_int("num_images_per_prompt", num_images_per_prompt)
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}; got {upsample_mode!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        arguments.real_in("guidance_scale", guidance_scale)
        arguments.real_in("guidance_rescale", guidance_rescale, 0.0, 1.0)
        arguments.real_in("eta", eta, 0.0, 1.0)
        arguments.check_clip_skip(clip_skip, (self.text_encoder, self.text_encoder_2))
        arguments.check_memory_budget(memory_budget)
        arguments.check_size_conditioning(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size)
        denoising_end = arguments.check_denoising_end(denoising_end)
        custom_schedule = arguments.check_custom_schedule(self.scheduler, timesteps, sigmas, stage_steps)
        if custom_schedule:
            num_inference_steps = custom_schedule_steps(self.scheduler, custom_schedule)
        batch_size = self._batch_size(prompt, prompt_embeds)
        arguments.check_generator(generator, batch_size * num_images_per_prompt)
        plan = self.plan(
            height, width, batch_size=batch_size, num_images_per_prompt=num_images_per_prompt,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, strength=strength,
            stage_steps=stage_steps, upsample_guidance=upsample_guidance, upsample_mode=upsample_mode, tile_size=tile_size,
            vae_tile_size=vae_tile_size, memory_budget=memory_budget, num_processes=num_processes,
            stage_attention=stage_attention,
        )
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )
        arguments.check_ip_adapter(self.unet, self.image_encoder, ip_adapter_image, ip_adapter_image_embeds)
        arguments.check_ip_adapter_masks(cross_attention_kwargs, [s.index for s in plan.stages if s.grid is not None])
        upsample_tiled = any(s.upsample is not None and s.upsample[0].num_tiles > 1 for s in plan.stages)
        check_vae(self.vae, upsample_tiled, ("decode", "encode"))
        if output_type != "latent":
            check_vae(self.vae, plan.decode.num_tiles > 1, ("decode",))
        base = plan.stages[0]
        latent_shape = (plan.batch, self.unet.config.in_channels, base.latent_height, base.latent_width)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have the base stage's shape {latent_shape}; got {tuple(latents.shape)}")

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._custom_schedule = custom_schedule
        self._interrupt = False
        self.num_stages = len(plan.stages)
        if denoising_end is not None and len(self._set_stage_timesteps(plan.stages[-1])) == 0:
            raise ValueError(f"denoising_end={denoising_end} leaves no step to the last stage, whose schedule "
                             "starts below that noise level; pass a larger denoising_end")

        sizes = (tuple(original_size or (base.height, base.width)), tuple(crops_coords_top_left),
                 tuple(target_size or (base.height, base.width)))
        cond = self._conditioning(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, *sizes,
            negative_size_conditioning(*sizes, negative_original_size, negative_crops_coords_top_left,
                                       negative_target_size),
            ip_adapter_image, ip_adapter_image_embeds,
        )
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        callback = (callback_on_step_end, callback_on_step_end_tensor_inputs)

        timings = []
        with self.progress_bar(total=len(plan.stages)) as stages_bar:
            for stage in plan.stages:
                stages_bar.set_description(f"stage {stage.index} {stage.width}x{stage.height}")
                latents, record = self._run_stage(stage, plan, latents, cond, generator, step_kwargs, callback)
                timings.append(record)
                stages_bar.update()
        self.stage_index = None

        if output_type == "latent":
            images = latents
        else:
            with _measured(latents.device) as record:
                image = self._vae_decode(latents, plan.decode)
            timings.append({"stage": "decode", "height": height, "width": width,
                            "tiles": plan.decode.num_tiles, **record})
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            if output_type != "pt":
                image = image.cpu()
            images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return GSPNPipelineOutput(images=images, plan=plan, timings=timings)

    # ---------------------------------------------------------------------------------------- stages

    def _run_stage(self, stage: StagePlan, plan: Plan, previous, cond, generator, step_kwargs, callback):
        """Run one stage with its attention; on out-of-memory, re-plan it with smaller tiles
        (``shrink_stage``) and run it again from its start latent. Returns (latents, timing record).
        A softmax stage unmounts the GSPN adapter for its length (every process alike: the plan is
        agreed); it is mounted again after, also when the stage raises."""
        self.stage_index = stage.index
        device = self._execution_device
        softmax = stage.attention == "softmax"
        with _measured(device) as record, self._gspn_unmounted() if softmax else nullcontext():
            timesteps = self._set_stage_timesteps(stage)
            start, guide = self._stage_start(stage, timesteps[0], plan, previous, cond, generator)
            attempts = 1
            while True:
                try:
                    with self._unet_graphs():
                        latents = self._denoise(stage, plan, timesteps, start, guide, cond, step_kwargs, callback)
                    break
                except torch.OutOfMemoryError as error:
                    if self._process()[1] > 1:  # the other processes wait in a collective: no re-plan
                        raise
                    try:
                        smaller = shrink_stage(plan, stage)
                    except RuntimeError:
                        raise error from None
                # Out of the except block, the failed attempt's tensors are released.
                logger.warning("stage %d ran out of memory with tiles %s; retrying with tiles %s%s",
                               stage.index, stage.tile, smaller.tile,
                               ", CFG sequential" if smaller.cfg_sequential else "")
                stage, attempts = smaller, attempts + 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                timesteps = self._set_stage_timesteps(stage)  # the scheduler starts the stage afresh
        f = self.vae_scale_factor
        record = {"stage": stage.index, "height": stage.height, "width": stage.width, "steps": stage.steps,
                  "attention": stage.attention, "tiles": stage.num_tiles,
                  "tile_size": None if stage.tile is None else (stage.tile[0] * f, stage.tile[1] * f),
                  "cfg_sequential": stage.cfg_sequential, "attempts": attempts, **record}
        return latents, record

    def _set_stage_timesteps(self, stage: StagePlan) -> torch.Tensor:
        """Set the scheduler to the stage's schedule and return its timesteps: the last ``stage.steps``
        of ``stage.schedule_steps`` (img2img's rule), starting the scheduler there; the schedule is the
        call's ``timesteps`` / ``sigmas`` when given, and the last stage stops at ``denoising_end``."""
        set_schedule(self.scheduler, stage.schedule_steps, self._execution_device, self._custom_schedule)
        order = getattr(self.scheduler, "order", 1)
        first = (stage.schedule_steps - stage.steps) * order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(first)
        timesteps = self.scheduler.timesteps[first:]
        if stage.index == self.num_stages - 1:
            timesteps = cut_at_denoising_end(timesteps, self.denoising_end, self.scheduler.config.num_train_timesteps)
        return timesteps

    def _stage_start(self, stage: StagePlan, first_timestep, plan: Plan, previous, cond, generator):
        """(start latent, guide) of a stage. Base stage: the initial noise (``previous`` is the user's
        ``latents`` or None), no guide. Upscale stage: the previous latent upsampled and noised to the
        stage's first timestep; the guide is (upsampled latent, that noise).
        With several processes, the main process's noise is everyone's."""
        device, dtype = self._execution_device, cond.prompt_embeds.dtype
        if stage.index == 0:
            start = self.prepare_latents(plan.batch, self.unet.config.in_channels, stage.height, stage.width,
                                         dtype, device, generator, previous)
            return distributed.broadcast(start.contiguous()), None
        source = self._upsample(previous, stage).to(dtype)
        noise = distributed.broadcast(randn_tensor(source.shape, generator=generator, device=device, dtype=dtype))
        start = self.scheduler.add_noise(source, noise, first_timestep.reshape(1).repeat(plan.batch))
        return start, (source, noise)

    def _upsample(self, latents: torch.Tensor, stage: StagePlan) -> torch.Tensor:
        """(B, c, h, w) latents of the previous stage -> (B, c, H / f, W / f) at this stage's size:
        bicubic on the latent, or, when the plan has VAE layouts for it, decode, resize, encode."""
        if stage.upsample is None:
            return F.interpolate(latents.float(), size=(stage.latent_height, stage.latent_width), mode="bicubic",
                                 align_corners=False)
        decode, encode = stage.upsample
        image = self._vae_decode(latents, decode)
        image = F.interpolate(image, size=(stage.height, stage.width), mode="bicubic", align_corners=False)
        return self._vae_encode(image.clamp_(-1, 1), encode)

    def _denoise(self, stage: StagePlan, plan: Plan, timesteps, start, guide, cond: Conditioning, step_kwargs,
                 callback) -> torch.Tensor:
        """Denoise ``start`` through ``timesteps`` (the scheduler is set to them); returns the latents."""
        # The step follows StableDiffusionXLPipeline.__call__'s denoising loop (diffusers 0.42).
        self._num_timesteps = len(timesteps)
        weights = {} if stage.grid is None else {
            k: stage.grid.weight(k, start.device) for k in {u.tile for u in stage.units}}
        callback_fn, callback_inputs = callback
        latents = start
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if guide is not None and i > 0 and stage.upsample_guidance > 0:
                    weight = stage.upsample_guidance * 0.5 * (1 + math.cos(math.pi * i / len(timesteps)))
                    source, noise = guide
                    target = self.scheduler.add_noise(source, noise, t.reshape(1).repeat(source.shape[0]))
                    latents = torch.lerp(latents, target.to(latents.dtype), weight)
                model_input = self.scheduler.scale_model_input(latents, t)
                noise_pred = self._predict_noise(model_input, t, cond, stage, weights)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_fn is not None:
                    latents = self._step_callback(callback_fn, callback_inputs, i, t, latents, cond)
                bar.update()
        return latents

    def _step_callback(self, callback_fn, names, i, t, latents, cond: Conditioning) -> torch.Tensor:
        fields = {"prompt_embeds": "prompt_embeds", "add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}
        kwargs = {name: latents if name == "latents" else getattr(cond, fields[name]) for name in names}
        outputs = callback_fn(self, i, t, kwargs) or {}
        for name, attr in fields.items():
            if name in outputs:
                setattr(cond, attr, outputs[name])
        return outputs.get("latents", latents)

    # ------------------------------------------------------------------------------------------ UNet

    def _predict_noise(self, model_input, t, cond: Conditioning, stage: StagePlan, weights) -> torch.Tensor:
        """The guided noise prediction for a (B, c, h, w) model input: the stage's units (``Unit``) of
        this process, each a UNet call on a tile (or the whole latent) for some images and CFG halves,
        blended per half with the tiles' weights (``weights``: tile -> (th, tw); they sum to one), then
        guided. Guidance is linear, so guiding the blended halves equals blending guided tiles."""
        halves = torch.zeros((2 if cond.cfg else 1, *model_input.shape), dtype=torch.float32,
                             device=model_input.device)
        for unit in stage.units_of(*self._process()):
            self._run_unit(unit, model_input, t, cond, stage, weights, halves)
        halves = self._gather_prediction(halves)
        # Follows the guidance of StableDiffusionXLPipeline.__call__'s denoising loop (diffusers 0.42).
        if not cond.cfg:
            return halves[0].to(model_input.dtype)
        uncond, text = halves
        noise = uncond + self.guidance_scale * (text - uncond)
        if self.guidance_rescale > 0:
            noise = rescale_noise_cfg(noise, text, guidance_rescale=self.guidance_rescale)
        return noise.to(model_input.dtype)

    def _run_unit(self, unit: Unit, model_input, t, cond: Conditioning, stage: StagePlan, weights, halves):
        """Add one unit's weighted UNet output into ``halves`` (2 or 1, B, c, h, w) float32."""
        images = slice(*unit.images)
        region = (images, slice(None)) + (() if unit.tile is None else stage.grid.tiles[unit.tile].slices())
        x = model_input[region]
        out = self._unet(x.repeat(len(unit.halves), 1, 1, 1), t, cond.select(unit.images, unit.halves))
        for half, noise in zip(unit.halves, out.chunk(len(unit.halves))):
            noise = noise.float()
            if unit.tile is not None:
                noise = noise * weights[unit.tile]
            halves[half][region] += noise

    def _process(self) -> tuple[int, int]:
        """(this process, number of processes) the plan's units are spread over."""
        return distributed.process()

    def _gather_prediction(self, halves: torch.Tensor) -> torch.Tensor:
        """Every process's weighted unit outputs summed: the whole blended prediction everywhere."""
        return distributed.all_reduce_sum(halves)

    def progress_bar(self, iterable=None, total=None):
        """diffusers' progress bar, on the main process only."""
        if not distributed.is_main_process():
            self._progress_bar_config = {**getattr(self, "_progress_bar_config", {}), "disable": True}
        return super().progress_bar(iterable=iterable, total=total)

    @contextmanager
    def _unet_graphs(self):
        """UNet calls replayed from CUDA graphs (when ``cuda_graphs`` and, per call, ``eager_reason`` allow)
        for the duration of the block: one stage attempt. Its graphs and their memory go at the end."""
        if not self.cuda_graphs or has_offload_hooks(self.unet):
            yield
            return
        with GraphedCalls(self._unet_forward) as graphed:
            self._graphed_unet = graphed
            try:
                yield
            finally:
                self._graphed_unet = None

    def _unet(self, x, t, cond: Conditioning) -> torch.Tensor:
        """(B, c, h, w) noise prediction of the UNet for ``x`` at timestep ``t``."""
        kwargs = dict(sample=x, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                      timestep_cond=cond.timestep_cond, added_cond_kwargs=cond.added_cond_kwargs())
        graphed = self._graphed_unet
        if graphed is not None and eager_reason(x, t, cross_attention_kwargs=self.cross_attention_kwargs,
                                                image_embeds=cond.image_embeds) is None:
            return graphed(**kwargs)
        return self._unet_forward(**kwargs, cross_attention_kwargs=self.cross_attention_kwargs)

    def _unet_forward(self, *, sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs,
                      cross_attention_kwargs=None) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
            cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )[0]

    # ---------------------------------------------------------------------------------- conditioning

    @staticmethod
    def _batch_size(prompt, prompt_embeds) -> int:
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        if prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        return prompt_embeds.shape[0]

    def _conditioning(self, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
                      prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                      original_size, crops_coords_top_left, target_size, negative_sizes=None,
                      ip_adapter_image=None, ip_adapter_image_embeds=None) -> Conditioning:
        """Encode the prompts, the micro-conditioning and IP-Adapter inputs (``conditioning.encode``, which
        follows StableDiffusionXLPipeline.__call__). ``negative_sizes``: (original size, crop offset, target
        size) of the unconditional half, or None for the positive ones.

        Every stage and tile gets the same micro-conditioning: by default that of the base stage's size
        (SDXL was trained around 1024^2; sizes of 16K are far outside what it has seen there)."""
        return encode(
            self, prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            size_conditioning=(original_size, crops_coords_top_left, target_size),
            negative_size_conditioning=negative_sizes, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )

    # ------------------------------------------------------------------------------------------- VAE

    @contextmanager
    def _vae_in_compute_dtype(self):
        original, dtype = self.vae.dtype, self._vae_compute_dtype()
        # nn.Module.to: ModelMixin.to warns about float32 modules on every cast, even when it lists none.
        if dtype != original:
            nn.Module.to(self.vae, dtype=dtype)
        try:
            yield dtype
        finally:
            if dtype != original:
                nn.Module.to(self.vae, dtype=original)

    def _latent_statistics(self, like: torch.Tensor):
        """(mean, std) the VAE's latents are normalised with, or (None, None) for scaling alone."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return None, None
        shape = (1, -1, 1, 1)
        return (torch.tensor(config.latents_mean).view(shape).to(like),
                torch.tensor(config.latents_std).view(shape).to(like))

    def _vae_decode(self, latents: torch.Tensor, layout: VaePlan) -> torch.Tensor:
        """(B, c, h, w) latents -> float32 (B, 3, h * f, w * f) image in [-1, 1], tiled as ``layout`` says."""
        mean, std = self._latent_statistics(latents)
        z = latents / self.vae.config.scaling_factor if mean is None else (
            latents * std / self.vae.config.scaling_factor + mean)
        with self._vae_in_compute_dtype() as dtype, self._tile_bar(layout, "VAE decode") as bar:
            return vae_decode(self.vae, z.to(dtype), layout.grid, layout.context, bar.update,
                              layout.tiles_of(*self._process()), self._tile_spread())

    def _vae_encode(self, image: torch.Tensor, layout: VaePlan) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> float32 (B, c, H / f, W / f) scaled latents (distribution mean)."""
        with self._vae_in_compute_dtype() as dtype, self._tile_bar(layout, "VAE encode") as bar:
            z = vae_encode(self.vae, image.to(dtype), layout.grid, layout.context, bar.update,
                           layout.tiles_of(*self._process()), self._tile_spread())
        mean, std = self._latent_statistics(z)
        if mean is None:
            return z * self.vae.config.scaling_factor
        return (z - mean) * self.vae.config.scaling_factor / std

    def _tile_spread(self) -> TileSpread | None:
        """How VAE tiles spread over processes share the context and join; None in one process."""
        if self._process()[1] == 1:
            return None
        device = self._execution_device
        return TileSpread(lambda whole, record: distributed.share_context(whole, record, device),
                          distributed.all_reduce_sum)

    def _tile_bar(self, layout: VaePlan, description: str):
        rank, world = self._process()
        bar = self.progress_bar(total=len(layout.tiles_of(rank, world) or [None]))
        bar.set_description(description)
        return bar


@contextmanager
def _measured(device: torch.device):
    """Yields a dict that gets ``seconds`` and ``peak_bytes`` (CUDA peak allocated; None elsewhere)."""
    record = {}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield record
    if cuda:
        torch.cuda.synchronize(device)
    record["seconds"] = time.perf_counter() - start
    record["peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
