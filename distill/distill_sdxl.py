"""Distil GSPN-2 layers for an SDXL UNet from its own softmax self-attention.

    accelerate launch distill/distill_sdxl.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --train_data_dir my_images --output_dir gspn-sdxl --mixed_precision bf16 --gradient_checkpointing
    python distill/distill_sdxl.py ...                     (one process)
    python -m gspn_diffusers.distill.distill_sdxl ...      (installed package)

Teacher = the UNet with softmax attention; student = the same UNet with a ``GSPNAdapter`` mounted; only
the GSPN parameters train (see ``student.py`` for how they share one UNet and what DDP wraps).
Losses per sample, then averaged: noise prediction (target per the scheduler's prediction_type), KD to the
teacher's prediction, and the per-layer relative feature loss between the attn1 outputs. An optional
first stage (``--layerwise_steps``) trains each layer alone on its teacher's input tokens.
Writes ``output_dir/checkpoint-N`` (accelerate state, atomic) and ``output_dir/gspn`` (the adapter,
``GSPNAdapter.from_pretrained``-able, with ``fidelity_report.json``), and ``output_dir/train_log.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: its folder must not shadow installed modules (data, models, ...)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import json
import logging
import shutil
import time
from datetime import timedelta

import torch

from gspn_diffusers.adapter import GSPNAdapter
from gspn_diffusers.distill import checkpoints
from gspn_diffusers.distill.args import parse_args
from gspn_diffusers.distill.data import (
    PURPOSE_FIDELITY, PURPOSE_NOISE, DistillDataset, DistillInputError, fidelity_items, make_dataloader,
    open_source, sample_generator,
)
from gspn_diffusers.distill.fidelity import fidelity_timesteps, format_table, measure_fidelity, write_report
from gspn_diffusers.distill.losses import AttentionTap, feature_losses, per_sample_mse, prediction_target
from gspn_diffusers.distill.models import (
    SDXLShape, check_sdxl_shape, encode_prompts, load_sdxl, random_sdxl, time_ids,
)
from gspn_diffusers.distill.run_settings import check_resume_settings, run_settings
from gspn_diffusers.distill.student import GSPNStudent, teacher_mode

logger = logging.getLogger("gspn_diffusers.distill")
METRICS = ("loss", "noise_loss", "kd_loss", "feature_loss", "elapsed_s")


def check_inputs(args):
    """Everything that can be refused before an Accelerator or a weight exists. Returns (shape, source, resume)."""
    if args.random_sdxl:
        shape = SDXLShape(vae_scale_factor=8, latent_channels=4)
    else:
        shape = check_sdxl_shape(args.pretrained_model_name_or_path, args.revision, args.variant)
    if args.resolution % shape.vae_scale_factor:
        raise DistillInputError(
            f"--resolution {args.resolution} is not a multiple of the VAE factor {shape.vae_scale_factor} "
            f"(try {args.resolution // shape.vae_scale_factor * shape.vae_scale_factor or shape.vae_scale_factor})"
        )
    source = open_source(args)
    resume = checkpoints.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint not in (None, "latest"):
        if resume is None or not (resume / checkpoints.STATE_FILE).is_file():
            raise DistillInputError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a complete checkpoint folder "
                f"(no {checkpoints.STATE_FILE})"
            )
    if resume is None and not args.overwrite_output_dir:
        found = checkpoints.run_files(args.output_dir, args.logging_dir)
        if found:
            what = ", ".join(path.name for path in found[:6]) + (", ..." if len(found) > 6 else "")
            without = " (it has no complete checkpoint to resume from)" if args.resume_from_checkpoint else ""
            raise DistillInputError(
                f"--output_dir {args.output_dir} holds a run{without}: {what}. Resume it with "
                "--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir "
                "to delete that run and start anew"
            )
    return shape, source, resume


class Distiller:
    """One distillation run: models, the step, checkpoints, reports. Built by ``main``."""

    def __init__(self, args, accelerator, shape, source):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.args, self.accelerator = args, accelerator
        self.device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                 torch.float32)
        if args.random_sdxl:
            self.components = random_sdxl(args.random_sdxl, self.device, self.weight_dtype, seed=args.seed)
        else:
            self.components = load_sdxl(args, self.device, self.weight_dtype)
        self.unet = self.components.unet
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if args.adapter_name_or_path:
            adapter = GSPNAdapter.from_pretrained(args.adapter_name_or_path)
        else:
            adapter = GSPNAdapter.for_unet(self.unet, proxy_ratio=args.proxy_ratio, gate_groups=args.gate_groups,
                                           chunk_size=args.chunk_size)
        self.adapter = torch.nn.Module.to(adapter, device=self.device, dtype=torch.float32)
        self.layers = list(self.adapter.config.layers)
        self.tap = AttentionTap(self.unet, self.adapter.attention_modules(self.unet))
        self.adapter.mount(self.unet, match_dtype=False)  # the student, for the whole run (teacher_mode unmounts)

        processes = accelerator.num_processes
        lr = args.learning_rate
        if args.scale_lr:
            lr *= args.gradient_accumulation_steps * args.train_batch_size * processes
        optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        # accelerate steps a prepared scheduler once per process per optimizer step (diffusers' convention).
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * processes,
                                     num_training_steps=args.max_train_steps * processes)
        student = GSPNStudent(self.adapter, self.unet, self.tap)
        self.student, self.optimizer, self.lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
        self.noise_scheduler = DDPMScheduler.from_config(self.components.scheduler_config)
        self.latent_shape = (shape.latent_channels,) + (args.resolution // shape.vae_scale_factor,) * 2
        self.dataset = DistillDataset(source, args.resolution, args.seed, args.center_crop, args.random_flip)
        self.settings = run_settings(args, accelerator.num_processes, accelerator.mixed_precision)
        self._fidelity_inputs = None
        self._teacher_images_done = False  # the teacher's validation images are made once per run
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------------ inputs

    @torch.no_grad()
    def make_inputs(self, batch: dict, purpose: int = PURPOSE_NOISE) -> dict:
        """Conditioning, latents, per-sample noise and timestep (from the stream positions), noisy latents."""
        # Follows the noising of diffusers' train_text_to_image_sdxl.py main loop (VAE latents * scaling_factor,
        # DDPMScheduler.add_noise), with noise and timesteps drawn per sample from its stream position.
        args, device, dtype = self.args, self.device, self.weight_dtype
        embeds, pooled = encode_prompts(self.components, batch["prompts"], device)
        conditioning = time_ids(batch["original_sizes"], batch["crop_top_lefts"], args.resolution, device, dtype)
        added = dict(text_embeds=pooled.to(dtype), time_ids=conditioning)
        steps, noises, extras = [], [], []
        for position in batch["positions"]:
            generator = sample_generator(args.seed, position, purpose)
            steps.append(int(torch.randint(self.noise_scheduler.config.num_train_timesteps, (1,), generator=generator)))
            noises.append(torch.randn(self.latent_shape, generator=generator))
            extras.append(torch.randn(self.latent_shape, generator=generator))
        noise, extra = torch.stack(noises).to(device), torch.stack(extras).to(device)
        if batch["pixel_values"] is not None:
            vae = self.components.vae
            dist = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
            latents = dist.mean + dist.std * extra.to(dist.mean.dtype)
            shift = vae.config.get("shift_factor") or 0.0
            latents = (latents.float() - shift) * vae.config.scaling_factor
        else:
            latents = self.teacher_latents(embeds.to(dtype), added, extra)
        timesteps = torch.tensor(steps, device=device, dtype=torch.long)
        return dict(
            latents=latents, noise=noise, timestep=timesteps, dtype=dtype,
            sample=self.noise_scheduler.add_noise(latents, noise, timesteps).to(dtype),
            target=prediction_target(self.noise_scheduler, latents, noise, timesteps),
            encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added,
        )

    @torch.no_grad()
    def teacher_latents(self, embeds, added, init_noise) -> torch.Tensor:
        """--prompts_file: the teacher samples each prompt (Euler, classifier-free guidance) from init_noise."""
        # Follows the denoising loop of diffusers' StableDiffusionXLPipeline.__call__ (guidance, scale_model_input,
        # scheduler.step).
        from diffusers import EulerDiscreteScheduler

        scheduler = EulerDiscreteScheduler.from_config(self.components.scheduler_config)
        scheduler.set_timesteps(self.args.teacher_sampling_steps, device=self.device)
        scale = self.args.teacher_guidance_scale
        guided = scale > 1.0
        if guided:  # SDXL's unconditional branch: zero embeddings (force_zeros_for_empty_prompt)
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            added = dict(text_embeds=torch.cat([torch.zeros_like(added["text_embeds"]), added["text_embeds"]]),
                         time_ids=torch.cat([added["time_ids"], added["time_ids"]]))
        latents = init_noise.float() * scheduler.init_noise_sigma
        unused_noise = torch.Generator(device=self.device.type).manual_seed(0)  # Euler draws noise it does not use
        with teacher_mode(self.adapter, self.unet), self.accelerator.autocast():
            for t in scheduler.timesteps:
                model_input = torch.cat([latents, latents]) if guided else latents
                model_input = scheduler.scale_model_input(model_input, t).to(self.weight_dtype)
                prediction = self.unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
                prediction = prediction.float()
                if guided:
                    uncond, cond = prediction.chunk(2)
                    prediction = uncond + scale * (cond - uncond)
                latents = scheduler.step(prediction, t, latents, generator=unused_noise).prev_sample
        return latents

    # ------------------------------------------------------------------------------------ losses

    def losses(self, stage: str, inputs: dict):
        """(total loss, metrics (4 + L,) detached): the step's loss and what it is made of."""
        args, unet = self.args, self.unet
        call = dict(sample=inputs["sample"], timestep=inputs["timestep"],
                    encoder_hidden_states=inputs["encoder_hidden_states"],
                    added_cond_kwargs=inputs["added_cond_kwargs"])
        zero = torch.zeros(inputs["sample"].shape[0], device=self.device)
        if stage == "layerwise":
            autocast = self.accelerator.autocast
            with teacher_mode(self.adapter, unet), self.tap.capture(inputs=True) as teacher, autocast():
                unet(**call)
            outputs = self.student("layerwise", tokens=teacher["inputs"], grids=teacher["grids"])
            per_layer = feature_losses(outputs, teacher["outputs"], self.layers)
            feature = per_layer.mean(0)
            total, noise, kd = feature.mean(), zero, zero
        else:
            need_teacher = args.kd_loss_weight > 0 or args.feature_loss_weight > 0
            if need_teacher:
                with teacher_mode(self.adapter, unet), self.tap.capture() as teacher, self.accelerator.autocast():
                    teacher_prediction = unet(**call).sample
            prediction, student_features = self.student("unet", **call)
            noise = per_sample_mse(prediction, inputs["target"])
            if need_teacher:
                kd = per_sample_mse(prediction, teacher_prediction)
                per_layer = feature_losses(student_features, teacher["outputs"], self.layers)
            else:
                kd, per_layer = zero, zero.new_zeros(len(self.layers), zero.shape[0])
            feature = per_layer.mean(0)
            total = (args.noise_loss_weight * noise + args.kd_loss_weight * kd
                     + args.feature_loss_weight * feature).mean()
        metrics = torch.cat([torch.stack([total.detach(), noise.mean(), kd.mean(), feature.mean()]).detach(),
                             per_layer.detach().mean(1)])
        return total, metrics

    # -------------------------------------------------------------------------------- reporting

    @torch.no_grad()
    def fidelity(self) -> dict | None:
        """The per-layer fidelity report on a fixed batch (main process; no collectives)."""
        if not self.args.fidelity_timesteps:
            return None
        if self._fidelity_inputs is None:
            batch = fidelity_items(self.dataset, self.args.fidelity_samples)
            self._fidelity_inputs = self.make_inputs(batch, purpose=PURPOSE_FIDELITY)
        timesteps = fidelity_timesteps(self.args.fidelity_timesteps, self.noise_scheduler.config.num_train_timesteps)
        return measure_fidelity(self.unet, self.adapter, self.tap, self.noise_scheduler, self._fidelity_inputs,
                                timesteps, self.accelerator.autocast)

    def export_adapter(self, folder: Path, step: int) -> dict | None:
        """save_pretrained the adapter into ``folder`` with its fidelity report; print the table."""
        self.accelerator.unwrap_model(self.student).adapter.save_pretrained(folder)
        report = self.fidelity()
        if report is not None:
            report["step"] = step
            write_report(report, folder)
            print(format_table(report), flush=True)
        return report

    def save_checkpoint(self, step: int) -> dict | None:
        """Every process writes its part into a temporary folder; the main process seals and renames it.

        No collective runs inside the main-process-only part; the barrier after it is reached by all.
        """
        accelerator, args = self.accelerator, self.args
        tmp = checkpoints.temporary_dir(args.output_dir, step)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        report = None
        if accelerator.is_main_process:
            report = self.export_adapter(tmp / checkpoints.ADAPTER_FOLDER, step)
            state = dict(global_step=step, num_processes=accelerator.num_processes,
                         global_batch_size=self.global_batch_size, seed=args.seed, layers=self.layers,
                         settings=self.settings)
            final = checkpoints.finalize(args.output_dir, step, state, args.checkpoints_total_limit)
            print(f"Saved {final} and exported the adapter to {Path(args.output_dir) / checkpoints.ADAPTER_FOLDER}",
                  flush=True)
        accelerator.wait_for_everyone()
        return report

    @property
    def global_batch_size(self) -> int:
        args = self.args
        return args.train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes

    # ------------------------------------------------------------------------------------- train

    def resume(self, checkpoint: Path) -> int:
        """Restore adapter, optimizer, lr scheduler and RNG states from ``checkpoint``; returns its step.

        Log lines after that step (written before the run was stopped) are dropped.
        """
        accelerator = self.accelerator
        accelerator.load_state(str(checkpoint))
        step = checkpoints.read_state(checkpoint)["global_step"]
        log_path = Path(self.args.output_dir) / checkpoints.LOG_FILE
        if accelerator.is_main_process and log_path.exists():
            kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            log_path.write_text("".join(line + "\n" for line in kept))
        accelerator.print(
            f"Resumed from {checkpoint} at step {step}/{self.args.max_train_steps}: adapter, optimizer, lr scheduler "
            f"and RNG states restored; the data stream continues at sample {step * self.global_batch_size} "
            f"({step * self.args.gradient_accumulation_steps} micro-batches already seen are skipped, nothing is "
            "reshuffled)"
        )
        return step

    def batches(self, global_step: int):
        """The micro-batches of this process from optimizer step ``global_step`` on (the stream's order)."""
        args, accelerator = self.args, self.accelerator
        return iter(make_dataloader(self.dataset, args.train_batch_size, accelerator.process_index,
                                    accelerator.num_processes, args.seed,
                                    global_step * args.gradient_accumulation_steps, args.dataloader_num_workers))

    def train_step(self, global_step: int, batches) -> dict:
        """One optimizer step (its micro-batches accumulated); returns its log record, the same on every process."""
        # The accumulate / backward / clip / step sequence follows diffusers' train_text_to_image_sdxl.py main loop.
        args, accelerator = self.args, self.accelerator
        stage = "layerwise" if global_step < args.layerwise_steps else "end_to_end"
        metrics = torch.zeros(len(METRICS) - 1 + len(self.layers), device=self.device)
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(self.student):
                inputs = self.make_inputs(batch)
                loss, step_metrics = self.losses(stage, inputs)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.student.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            metrics += step_metrics / args.gradient_accumulation_steps
            del inputs, loss
        elapsed = torch.tensor([time.perf_counter() - self._started], device=self.device)
        values = accelerator.reduce(torch.cat([metrics[:4], elapsed, metrics[4:]]), "mean").tolist()  # every process
        return dict(step=global_step + 1, stage=stage, lr=self.lr_scheduler.get_last_lr()[0],
                    **dict(zip(METRICS, values[:5])), layer_feature_loss=values[5:])

    def log(self, record: dict) -> None:
        """Append ``record`` to train_log.jsonl and send its numbers to the trackers (main process)."""
        if self.accelerator.is_main_process:
            with (Path(self.args.output_dir) / checkpoints.LOG_FILE).open("a") as log:
                log.write(json.dumps(record) + "\n")
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=record["step"])

    def validate(self, step: int) -> None:
        """Validation images of the student (and, the first time, the teacher); every process waits."""
        if self.accelerator.is_main_process:
            from gspn_diffusers.distill.validation import log_validation

            log_validation(self.accelerator, self.components, self.adapter, self.args, step,
                           with_teacher=not self._teacher_images_done)
            self._teacher_images_done = True
        self.accelerator.wait_for_everyone()

    def train(self, resume: Path | None, callbacks=()) -> int:
        """Train to ``--max_train_steps`` (from ``resume`` if given); returns the last step.

        ``callbacks``: objects with any of ``on_train_begin(distiller, step)``, ``on_step_end(distiller,
        record) -> bool`` (True stops the run after this step; it must answer alike on every process, e.g.
        from the record, which is) and ``on_train_end(distiller, step)``; all are called on every process.
        The last step is always checkpointed and its adapter published to output_dir/gspn.
        """
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        global_step = self.resume(resume) if resume is not None else 0
        batches = self.batches(global_step)
        for callback in callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(self, global_step)
        accelerator.print(
            f"Distilling {len(self.layers)} GSPN layers ({sum(p.numel() for p in self.adapter.parameters()):,} "
            f"parameters) on {accelerator.num_processes} process(es): {len(self.dataset)} samples, global batch "
            f"{self.global_batch_size}, steps {global_step} -> {args.max_train_steps} (layerwise until step "
            f"{args.layerwise_steps})"
        )
        progress = tqdm(total=args.max_train_steps, initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        self._started = time.perf_counter()
        last_saved = global_step if resume is not None else None
        while global_step < args.max_train_steps:
            record = self.train_step(global_step, batches)
            global_step = record["step"]
            self.log(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4g}", noise=f"{record['noise_loss']:.3g}",
                                 kd=f"{record['kd_loss']:.3g}", feat=f"{record['feature_loss']:.3g}",
                                 lr=f"{record['lr']:.2g}", stage=record["stage"][:5])
            if global_step % args.checkpointing_steps == 0:
                self.save_checkpoint(global_step)
                last_saved = global_step
            if args.validation_prompt and global_step % args.validation_steps == 0:
                self.validate(global_step)
            stops = [callback.on_step_end(self, record) for callback in callbacks if hasattr(callback, "on_step_end")]
            if any(stops):
                break
        progress.close()
        if last_saved != global_step:
            self.save_checkpoint(global_step)
        elif accelerator.is_main_process:  # resumed at the last step: publish its adapter again
            path = Path(args.output_dir) / f"checkpoint-{global_step}" / checkpoints.ADAPTER_FOLDER
            if path.is_dir():
                checkpoints.publish_adapter(path, args.output_dir)
        for callback in callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(self, global_step)
        return global_step


def prepare_output_dir(args, accelerator) -> None:
    """Main process: remove a killed save's leftovers and, with --overwrite_output_dir, the old run."""
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        if args.overwrite_output_dir:
            for path in checkpoints.remove_run(output_dir, args.logging_dir):
                logger.info("--overwrite_output_dir: removed %s", path)
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_stale_temporaries(output_dir)
    accelerator.wait_for_everyone()


def setup(args, distiller_class=None):
    """Check the input, start accelerate, build the models: returns (distiller, checkpoint to resume or None).

    Everything that can be refused is refused (DistillInputError) in every process before anything is
    written or loaded. ``distiller_class``: a ``Distiller`` subclass to build instead (benchmarks).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    shape, source, resume = check_inputs(args)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    settings = run_settings(args, accelerator.num_processes, accelerator.mixed_precision)
    if resume is not None:
        check_resume_settings(resume, checkpoints.read_state(resume).get("settings"), settings)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
                        if accelerator.is_main_process else logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    prepare_output_dir(args, accelerator)
    distiller = (distiller_class or Distiller)(args, accelerator, shape, source)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    return distiller, resume


def main(argv=None) -> Path:
    """Run a distillation; returns the exported adapter folder (output_dir/gspn)."""
    distiller, resume = setup(parse_args(argv))
    distiller.train(resume)
    distiller.accelerator.wait_for_everyone()
    distiller.accelerator.end_training()
    return Path(distiller.args.output_dir) / checkpoints.ADAPTER_FOLDER


def cli() -> None:
    try:
        main()
    except DistillInputError as error:
        sys.exit(f"distill_sdxl.py: error: {error}")


if __name__ == "__main__":
    cli()
