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
from gspn_diffusers.distill.student import GSPNStudent, teacher_mode

logger = logging.getLogger("gspn_diffusers.distill")
LOG_FILE = "train_log.jsonl"
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
        self._fidelity_inputs = None
        self._teacher_images_done = False  # the teacher's validation images are made once per run

    # ------------------------------------------------------------------------------------ inputs

    @torch.no_grad()
    def make_inputs(self, batch: dict, purpose: int = PURPOSE_NOISE) -> dict:
        """Conditioning, latents, per-sample noise and timestep (from the stream positions), noisy latents."""
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
                         global_batch_size=self.global_batch_size, seed=args.seed, layers=self.layers)
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

    def train(self, resume: Path | None) -> dict:
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        accumulation = args.gradient_accumulation_steps
        output_dir = Path(args.output_dir)
        log_path = output_dir / LOG_FILE
        global_step = 0
        if resume is not None:
            accelerator.load_state(str(resume))
            state = checkpoints.read_state(resume)
            global_step = state["global_step"]
            if state.get("global_batch_size") != self.global_batch_size:
                logger.warning("the checkpoint was made with global batch %s, this run has %s: the data order differs",
                               state.get("global_batch_size"), self.global_batch_size)
            if accelerator.is_main_process and log_path.exists():  # drop steps logged after the checkpoint
                kept = [line for line in log_path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= global_step]
                log_path.write_text("".join(line + "\n" for line in kept))
            accelerator.print(
                f"Resumed from {resume} at step {global_step}/{args.max_train_steps}: adapter, optimizer, lr scheduler "
                f"and RNG states restored; the data stream continues at sample {global_step * self.global_batch_size} "
                f"({global_step * accumulation} micro-batches already seen are skipped, nothing is reshuffled)"
            )
        elif args.resume_from_checkpoint:
            accelerator.print(f"No checkpoint in {output_dir} to resume from; starting a new run")
        if accelerator.is_main_process and resume is None:
            log_path.unlink(missing_ok=True)

        loader = make_dataloader(self.dataset, args.train_batch_size, accelerator.process_index,
                                 accelerator.num_processes, args.seed, global_step * accumulation,
                                 args.dataloader_num_workers)
        batches = iter(loader)
        bench = dict(step_seconds=[], data_seconds=[], first=None, last=None, setup_peak_gib=0.0)
        if args.benchmark_json and accelerator.is_main_process:
            if resume is None:  # what both runs of a 1-vs-N-process comparison start from (compare_adapters.py)
                self.adapter.save_pretrained(output_dir / "gspn-initial")
            if args.fidelity_timesteps:
                bench["fidelity_start"] = self.fidelity()
        accelerator.wait_for_everyone()
        if self.device.type == "cuda":
            bench["setup_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)

        accelerator.print(
            f"Distilling {len(self.layers)} GSPN layers ({sum(p.numel() for p in self.adapter.parameters()):,} "
            f"parameters) on {accelerator.num_processes} process(es): {len(self.dataset)} samples, global batch "
            f"{self.global_batch_size}, steps {global_step} -> {args.max_train_steps} (layerwise until step "
            f"{args.layerwise_steps})"
        )
        progress = tqdm(total=args.max_train_steps, initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        started = time.perf_counter()
        last_saved = global_step if resume is not None else None
        while global_step < args.max_train_steps:
            stage = "layerwise" if global_step < args.layerwise_steps else "end_to_end"
            step_start, data_time = time.perf_counter(), 0.0
            metrics = torch.zeros(len(METRICS) - 1 + len(self.layers), device=self.device)
            for _ in range(accumulation):
                batch = next(batches)
                with accelerator.accumulate(self.student):
                    data_start = time.perf_counter()
                    inputs = self.make_inputs(batch)
                    data_time += time.perf_counter() - data_start
                    loss, step_metrics = self.losses(stage, inputs)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.student.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                metrics += step_metrics / accumulation
                del inputs, loss
            global_step += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            bench["step_seconds"].append(time.perf_counter() - step_start)
            bench["data_seconds"].append(data_time)
            elapsed = torch.tensor([time.perf_counter() - started], device=self.device)
            reduced = accelerator.reduce(torch.cat([metrics[:4], elapsed, metrics[4:]]), "mean")  # every process
            values = reduced.tolist()
            record = dict(step=global_step, stage=stage, lr=self.lr_scheduler.get_last_lr()[0],
                          **dict(zip(METRICS, values[:5])), layer_feature_loss=values[5:])
            bench["first"] = bench["first"] or record
            bench["last"] = record
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{values[0]:.4g}", noise=f"{values[1]:.3g}", kd=f"{values[2]:.3g}",
                                 feat=f"{values[3]:.3g}", lr=f"{record['lr']:.2g}", stage=stage[:5])
            out_of_time = args.max_train_seconds is not None and values[4] >= args.max_train_seconds
            if global_step % args.checkpointing_steps == 0:
                self.save_checkpoint(global_step)
                last_saved = global_step
            if args.validation_prompt and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    from gspn_diffusers.distill.validation import log_validation

                    log_validation(accelerator, self.components, self.adapter, args, global_step,
                                   with_teacher=not self._teacher_images_done)
                    self._teacher_images_done = True
                accelerator.wait_for_everyone()
            if out_of_time:
                accelerator.print(f"--max_train_seconds {args.max_train_seconds} reached at step {global_step}")
                break
        progress.close()
        if last_saved != global_step:
            self.save_checkpoint(global_step)
        elif accelerator.is_main_process:
            path = output_dir / f"checkpoint-{global_step}" / checkpoints.ADAPTER_FOLDER
            if path.is_dir():
                checkpoints.publish_adapter(path, output_dir)
        bench["final_step"] = global_step
        return bench


def write_benchmark(path: str, distiller: Distiller, bench: dict, peaks: list[float]) -> dict:
    args, accelerator = distiller.args, distiller.accelerator
    steps = bench["step_seconds"]
    if not steps:
        print(f"benchmark: no step ran (the run was already at step {bench['final_step']}); {path} not written")
        return {}
    timed = steps[2:] if len(steps) > 4 else steps[1:] or steps  # the first steps build caches and kernels
    median = sorted(timed)[len(timed) // 2]
    data = sorted(bench["data_seconds"][-len(timed):])[len(timed) // 2]
    final_report = None
    report_path = Path(args.output_dir) / checkpoints.ADAPTER_FOLDER / "fidelity_report.json"
    if report_path.exists():
        final_report = json.loads(report_path.read_text())
    first, last = bench["first"], bench["last"]
    result = dict(
        device=torch.cuda.get_device_name(distiller.device) if distiller.device.type == "cuda" else "cpu",
        num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
        model=args.pretrained_model_name_or_path or f"random {args.random_sdxl} SDXL",
        resolution=args.resolution, train_batch_size=args.train_batch_size,
        global_batch_size=distiller.global_batch_size, gradient_checkpointing=args.gradient_checkpointing,
        layers=distiller.layers, steps_run=len(steps), final_step=bench["final_step"],
        seconds_per_step=median, steps_per_second=1.0 / median, data_seconds_per_step=data,
        step_seconds=steps, peak_memory_gib_per_process=peaks, setup_peak_memory_gib_main=bench["setup_peak_gib"],
        gspn_backend="cuda" if distiller.device.type == "cuda" else "reference",
        feature_loss_first_step=dict(step=first["step"], stage=first["stage"], mean=first["feature_loss"],
                                     per_layer=dict(zip(distiller.layers, first["layer_feature_loss"]))),
        feature_loss_last_step=dict(step=last["step"], stage=last["stage"], mean=last["feature_loss"],
                                    per_layer=dict(zip(distiller.layers, last["layer_feature_loss"]))),
        fidelity_start=(bench.get("fidelity_start") or {}).get("mean"),
        fidelity_end=(final_report or {}).get("mean"),
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"benchmark: {median:.3f} s/step, peak {max(peaks):.1f} GiB, feature loss "
          f"{first['feature_loss']:.4g} (step {first['step']}) -> {last['feature_loss']:.4g} (step {last['step']}); "
          f"wrote {path}", flush=True)
    return result


def main(argv=None) -> Path:
    """Run a distillation; returns the exported adapter folder (output_dir/gspn)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    args = parse_args(argv)
    shape, source, resume = check_inputs(args)  # refuses bad input in every process, before any collective
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
                        if accelerator.is_main_process else logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_stale_temporaries(output_dir)
    accelerator.wait_for_everyone()

    distiller = Distiller(args, accelerator, shape, source)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    bench = distiller.train(resume)
    peak = torch.cuda.max_memory_allocated(distiller.device) / 2**30 if distiller.device.type == "cuda" else 0.0
    peaks = accelerator.gather(torch.tensor([peak], device=distiller.device)).tolist()  # every process
    if accelerator.is_main_process and args.benchmark_json:
        write_benchmark(args.benchmark_json, distiller, bench, peaks)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir / checkpoints.ADAPTER_FOLDER


def cli() -> None:
    try:
        main()
    except DistillInputError as error:
        sys.exit(f"distill_sdxl.py: error: {error}")


if __name__ == "__main__":
    cli()
