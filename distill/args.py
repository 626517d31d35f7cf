"""Command-line flags of distill_sdxl.py, named as in diffusers' training scripts where they exist
(train_text_to_image_sdxl.py's ``parse_args``: model, data, optimizer, checkpoint and tracker flags).

A value that is wrong on its own is refused by argparse (type functions, choices: "error: argument
--learning_rate: ..."); combinations are checked by ``check_flags``.
"""

from __future__ import annotations

import argparse
import importlib.util

from gspn_diffusers.distill.data import DistillInputError


# diffusers.optimization.SchedulerType without piecewise_constant, which needs step rules this script does not take
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _number(kind, low, low_included=True, high=None):
    """An argparse type: ``kind`` (int / float) at least (or above) ``low`` and below ``high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or value < low or (value == low and not low_included) or (high is not None and value >= high):
            bound = f"{'>=' if low_included else '>'} {low}" + (f" and < {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0, low_included=False)
non_negative_float = _number(float, 0)
beta = _number(float, 0, high=1)


def _chunk(value: str):
    return None if value.lower() in ("none", "global", "0") else positive_int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Distil GSPN-2 layers for an SDXL UNet from its own softmax self-attention (teacher).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="an SDXL pipeline folder or Hub id (diffusers layout)")
    model.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="a VAE to use instead of the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    model.add_argument("--revision", type=str, default=None, help='model revision (branch, tag or commit) on the Hub')
    model.add_argument("--variant", type=str, default=None, help="weights variant, e.g. fp16")
    model.add_argument("--random_sdxl", choices=("full", "tiny"), default=None,
                       help="no weights: build SDXL's architecture ('full' = base 1.0 size, 'tiny' = test size) with "
                            "random weights on the device, byte-level tokenizers (benchmarks, smoke tests)")

    adapter = p.add_argument_group("GSPN adapter")
    adapter.add_argument("--proxy_ratio", type=positive_int, default=8, help="proxy width = layer width / proxy_ratio")
    adapter.add_argument("--gate_groups", type=positive_int, default=1,
                         help="gate groups G (1 = GSPN-2 channel-shared)")
    adapter.add_argument("--chunk_size", type=_chunk, default=None,
                         help="lines per propagation chunk: an int (local) or 'none' (global)")
    adapter.add_argument("--adapter_name_or_path", type=str, default=None,
                         help="start from this GSPNAdapter (folder or Hub id) instead of the teacher-initialised one")

    data = p.add_argument_group("data (one source)")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="image folder with metadata.jsonl (file_name + caption); with --dataset_name: its data_dir")
    data.add_argument("--dataset_name", type=str, default=None, help="a `datasets` dataset (Hub id or local folder)")
    data.add_argument("--dataset_config_name", type=str, default=None, help="the dataset's configuration")
    data.add_argument("--prompts_file", type=str, default=None,
                      help="text file, one prompt a line: no images, the teacher makes the training latents")
    data.add_argument("--image_column", type=str, default="image", help='--dataset_name: the column holding the images')
    data.add_argument("--caption_column", type=str, default="text",
                      help='the column (metadata.jsonl key) holding the captions')
    data.add_argument("--max_train_samples", type=positive_int, default=None, help='use only the first N samples')
    data.add_argument("--cache_dir", type=str, default=None, help='where downloaded models and datasets are cached')
    data.add_argument("--resolution", type=positive_int, default=1024, help="square training size in pixels")
    data.add_argument("--center_crop", action="store_true", help="centre crops (default: random crops)")
    data.add_argument("--random_flip", action="store_true", help='flip training images horizontally at random')
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0,
                      help='data loading worker processes (0: in the main process)')
    data.add_argument("--teacher_sampling_steps", type=positive_int, default=10,
                      help="--prompts_file: Euler steps the teacher takes to make each training latent")
    data.add_argument("--teacher_guidance_scale", type=non_negative_float, default=5.0,
                      help="--prompts_file: classifier-free guidance of the teacher's sampling")

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="gspn-distilled",
                       help="a folder that holds a run is refused unless resuming or --overwrite_output_dir")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="start a new run in an --output_dir that holds one: delete that run's checkpoints, "
                            "adapter, log and validation images first")
    train.add_argument("--seed", type=non_negative_int, default=0,
                       help="fixes data order, noise and timesteps (exact resume)")
    train.add_argument("--train_batch_size", type=positive_int, default=1, help="per process")
    train.add_argument("--max_train_steps", type=positive_int, default=10000,
                       help="optimizer steps, layerwise stage included")
    train.add_argument("--layerwise_steps", type=non_negative_int, default=0,
                       help="first stage: this many steps train each GSPN layer alone against its attn1 "
                            "(teacher's input tokens, feature loss only), then end-to-end")
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                       help='micro-batches per optimizer step')
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute the UNet's activations in backward (less memory, slower)")
    train.add_argument("--learning_rate", type=non_negative_float, default=1e-3,
                       help='AdamW learning rate of the GSPN parameters')  # 1e-3 over 1e-4: docs/quality.md
    train.add_argument("--scale_lr", action="store_true",
                       help="multiply the learning rate by accumulation steps x batch size x processes")
    train.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
                       help='learning-rate schedule (diffusers.optimization.get_scheduler)')
    train.add_argument("--lr_warmup_steps", type=non_negative_int, default=0, help='optimizer steps of linear warm-up')
    train.add_argument("--adam_beta1", type=beta, default=0.9, help='AdamW beta1')
    train.add_argument("--adam_beta2", type=beta, default=0.999, help='AdamW beta2')
    train.add_argument("--adam_weight_decay", type=non_negative_float, default=0.0, help='AdamW weight decay')
    train.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help='AdamW epsilon')
    train.add_argument("--max_grad_norm", type=positive_float, default=1.0, help='clip the gradient norm to this')
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="frozen weights in this dtype, GSPN weights float32 (default: accelerate config)")
    train.add_argument("--allow_tf32", action="store_true", help='TF32 matmuls on Ampere and newer GPUs')
    train.add_argument("--ddp_timeout", type=positive_int, default=1800, help="seconds a process waits in a collective")

    loss = p.add_argument_group("losses")
    loss.add_argument("--noise_loss_weight", type=non_negative_float, default=1.0,
                      help="MSE to the true target (noise, v or sample, per the scheduler's prediction_type)")
    loss.add_argument("--kd_loss_weight", type=non_negative_float, default=1.0, help="MSE to the teacher's prediction")
    loss.add_argument("--feature_loss_weight", type=non_negative_float, default=1.0,
                      help="mean over layers of ||student attn1 - teacher attn1||^2 / ||teacher attn1||^2")

    ckpt = p.add_argument_group("checkpoints, validation, logging")
    ckpt.add_argument("--checkpointing_steps", type=positive_int, default=500,
                      help='save a resumable checkpoint (and export the adapter) every N optimizer steps')
    ckpt.add_argument("--checkpoints_total_limit", type=positive_int, default=None,
                      help='keep only the newest N checkpoints (None: all)')
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help='"latest" or a checkpoint folder; refused if the run-defining flags differ from the '
                           "checkpoint's (steps, checkpointing, validation and logging flags may change)")
    ckpt.add_argument("--fidelity_timesteps", type=non_negative_int, default=4,
                      help="timesteps of the per-layer fidelity report (0: no report)")
    ckpt.add_argument("--fidelity_samples", type=positive_int, default=1,
                      help="samples of the fidelity report's fixed batch")
    ckpt.add_argument("--validation_prompt", type=str, default=None,
                      help='generate images of this prompt every --validation_steps (student; teacher once)')
    ckpt.add_argument("--num_validation_images", type=positive_int, default=2, help='images per validation')
    ckpt.add_argument("--validation_steps", type=positive_int, default=500, help='optimizer steps between validations')
    ckpt.add_argument("--validation_inference_steps", type=positive_int, default=25,
                      help='sampling steps of each validation image')
    ckpt.add_argument("--report_to", type=str, default="none", help='"tensorboard", "wandb", "all" or "none"')
    ckpt.add_argument("--logging_dir", type=str, default="logs", help='tracker logs, inside --output_dir')
    ckpt.add_argument("--tracker_project_name", type=str, default="gspn-distill-sdxl",
                      help='project name given to the trackers')
    return p


def check_flags(args) -> None:
    """Refuse flag values that cannot work, naming the flag (before anything is loaded)."""
    if bool(args.pretrained_model_name_or_path) == bool(args.random_sdxl):
        raise DistillInputError("pass exactly one of --pretrained_model_name_or_path and --random_sdxl")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise DistillInputError("--overwrite_output_dir starts a new run; it cannot go with --resume_from_checkpoint")
    if args.layerwise_steps > args.max_train_steps:
        raise DistillInputError(
            f"--layerwise_steps ({args.layerwise_steps}) must be between 0 and "
            f"--max_train_steps ({args.max_train_steps})"
        )
    if not (args.noise_loss_weight or args.kd_loss_weight or args.feature_loss_weight):
        raise DistillInputError("--noise_loss_weight, --kd_loss_weight and --feature_loss_weight are all 0")
    wanted = {"all": ["tensorboard", "wandb"]}.get(args.report_to, [] if args.report_to == "none" else [args.report_to])
    for tracker in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(tracker, tracker)
        if importlib.util.find_spec(module) is None and not (
            tracker == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            raise DistillInputError(f"--report_to {args.report_to}: {tracker} is not installed (pip install {tracker})")


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None):
    """Parse and check the flags; ``parser``: ``build_parser()`` with more flags added (benchmarks)."""
    args = (parser or build_parser()).parse_args(argv)
    check_flags(args)
    return args
