"""Command-line flags of distill_sdxl.py, named as in diffusers' training scripts where they exist."""

from __future__ import annotations

import argparse
import importlib.util

from gspn_diffusers.distill.data import DistillInputError


def _chunk(value: str):
    return None if value.lower() in ("none", "global", "0") else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Distil GSPN-2 layers for an SDXL UNet from its own softmax self-attention (teacher).",
    )
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="an SDXL pipeline folder or Hub id (diffusers layout)")
    model.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="a VAE to use instead of the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--variant", type=str, default=None, help="weights variant, e.g. fp16")
    model.add_argument("--random_sdxl", choices=("full", "tiny"), default=None,
                       help="no weights: build SDXL's architecture ('full' = base 1.0 size, 'tiny' = test size) with "
                            "random weights on the device, byte-level tokenizers (benchmarks, smoke tests)")

    adapter = p.add_argument_group("GSPN adapter")
    adapter.add_argument("--proxy_ratio", type=int, default=8, help="proxy width = layer width / proxy_ratio")
    adapter.add_argument("--gate_groups", type=int, default=1, help="gate groups G (1 = GSPN-2 channel-shared)")
    adapter.add_argument("--chunk_size", type=_chunk, default=None,
                         help="lines per propagation chunk: an int (local) or 'none' (global, default)")
    adapter.add_argument("--adapter_name_or_path", type=str, default=None,
                         help="start from this GSPNAdapter (folder or Hub id) instead of the teacher-initialised one")

    data = p.add_argument_group("data (one source)")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="image folder with metadata.jsonl (file_name + caption); with --dataset_name: its data_dir")
    data.add_argument("--dataset_name", type=str, default=None, help="a `datasets` dataset (Hub id or local folder)")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--prompts_file", type=str, default=None,
                      help="text file, one prompt a line: no images, the teacher makes the training latents")
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--caption_column", type=str, default="text")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--resolution", type=int, default=1024, help="square training size in pixels")
    data.add_argument("--center_crop", action="store_true", help="centre crops (default: random crops)")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--teacher_sampling_steps", type=int, default=10,
                      help="--prompts_file: Euler steps the teacher takes to make each training latent")
    data.add_argument("--teacher_guidance_scale", type=float, default=5.0)

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="gspn-distilled")
    train.add_argument("--seed", type=int, default=0, help="fixes data order, noise and timesteps (exact resume)")
    train.add_argument("--train_batch_size", type=int, default=1, help="per process")
    train.add_argument("--max_train_steps", type=int, default=10000, help="optimizer steps, layerwise stage included")
    train.add_argument("--max_train_seconds", type=float, default=None,
                       help="also stop (and save) once this much wall time was spent training")
    train.add_argument("--layerwise_steps", type=int, default=0,
                       help="first stage: this many steps train each GSPN layer alone against its attn1 "
                            "(teacher's input tokens, feature loss only), then end-to-end")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--scale_lr", action="store_true",
                       help="multiply the learning rate by accumulation steps x batch size x processes")
    train.add_argument("--lr_scheduler", type=str, default="constant",
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                            '"constant_with_warmup"')
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="frozen weights in this dtype, GSPN weights float32 (default: accelerate config)")
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--ddp_timeout", type=int, default=1800, help="seconds a process waits in a collective")

    loss = p.add_argument_group("losses")
    loss.add_argument("--noise_loss_weight", type=float, default=1.0,
                      help="MSE to the true target (noise, v or sample, per the scheduler's prediction_type)")
    loss.add_argument("--kd_loss_weight", type=float, default=1.0, help="MSE to the teacher's prediction")
    loss.add_argument("--feature_loss_weight", type=float, default=1.0,
                      help="mean over layers of ||student attn1 - teacher attn1||^2 / ||teacher attn1||^2")

    ckpt = p.add_argument_group("checkpoints, validation, logging")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500)
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None)
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder')
    ckpt.add_argument("--fidelity_timesteps", type=int, default=4,
                      help="timesteps of the per-layer fidelity report (0: no report)")
    ckpt.add_argument("--fidelity_samples", type=int, default=1)
    ckpt.add_argument("--validation_prompt", type=str, default=None)
    ckpt.add_argument("--num_validation_images", type=int, default=2)
    ckpt.add_argument("--validation_steps", type=int, default=500)
    ckpt.add_argument("--validation_inference_steps", type=int, default=25)
    ckpt.add_argument("--report_to", type=str, default="none", help='"tensorboard", "wandb", "all" or "none"')
    ckpt.add_argument("--logging_dir", type=str, default="logs")
    ckpt.add_argument("--tracker_project_name", type=str, default="gspn-distill-sdxl")
    ckpt.add_argument("--benchmark_json", type=str, default=None,
                      help="write seconds per step, peak memory per process and the per-layer feature loss of "
                           "the first and last step to this JSON file")
    return p


def check_flags(args) -> None:
    """Refuse flag values that cannot work, naming the flag (before anything is loaded)."""
    if bool(args.pretrained_model_name_or_path) == bool(args.random_sdxl):
        raise DistillInputError("pass exactly one of --pretrained_model_name_or_path and --random_sdxl")
    positive = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_steps", "resolution", "proxy_ratio", "gate_groups", "teacher_sampling_steps",
                "fidelity_samples")
    for name in positive:
        if getattr(args, name) < 1:
            raise DistillInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise DistillInputError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if not 0 <= args.layerwise_steps <= args.max_train_steps:
        raise DistillInputError(
            f"--layerwise_steps ({args.layerwise_steps}) must be between 0 and "
            f"--max_train_steps ({args.max_train_steps})"
        )
    if args.fidelity_timesteps < 0:
        raise DistillInputError(f"--fidelity_timesteps must be >= 0, got {args.fidelity_timesteps}")
    if min(args.noise_loss_weight, args.kd_loss_weight, args.feature_loss_weight) < 0 or not (
        args.noise_loss_weight or args.kd_loss_weight or args.feature_loss_weight
    ):
        raise DistillInputError("loss weights must be >= 0 and not all 0")
    wanted = {"all": ["tensorboard", "wandb"]}.get(args.report_to, [] if args.report_to == "none" else [args.report_to])
    for tracker in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(tracker, tracker)
        if importlib.util.find_spec(module) is None and not (
            tracker == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            raise DistillInputError(f"--report_to {args.report_to}: {tracker} is not installed (pip install {tracker})")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    return args
