"""What defines a run, so that a resume that would silently change it is refused.

A checkpoint stores the settings that decide what training computes (model, data, resolution, batch
and accumulation, processes, precision, adapter shape, seed, optimizer, losses, layerwise stage);
resuming compares them with the new run's, one line per difference. The flags that only decide how
long it runs, how it is saved, reported or validated, or how fast it goes may change.
"""

from __future__ import annotations

from gspn_diffusers.distill.data import DistillInputError

SAFE_TO_CHANGE = frozenset({
    "max_train_steps", "output_dir", "resume_from_checkpoint", "overwrite_output_dir",
    "checkpointing_steps", "checkpoints_total_limit",
    "fidelity_timesteps", "fidelity_samples",
    "validation_prompt", "num_validation_images", "validation_steps", "validation_inference_steps",
    "report_to", "logging_dir", "tracker_project_name",
    "dataloader_num_workers", "ddp_timeout", "allow_tf32", "gradient_checkpointing", "cache_dir",
})


def run_settings(args, num_processes: int, mixed_precision: str) -> dict:
    """{setting: value} of every flag that defines the run, plus the processes and the precision in use."""
    settings = {name: value for name, value in sorted(vars(args).items()) if name not in SAFE_TO_CHANGE}
    settings["mixed_precision"] = mixed_precision  # as accelerate resolved it (flag or accelerate config)
    settings["num_processes"] = num_processes
    return settings


def check_resume_settings(checkpoint, saved: dict | None, current: dict) -> None:
    """DistillInputError listing each setting that differs (``--flag old -> new``); None ``saved``: no check."""
    if saved is None:
        return
    differences = [
        f"{'processes' if name == 'num_processes' else '--' + name} {saved.get(name)!r} -> {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if name not in SAFE_TO_CHANGE and saved.get(name) != current.get(name)
    ]
    if differences:
        raise DistillInputError(
            f"cannot resume from {checkpoint}: it was trained with other settings, which would change what the "
            "rest of the run computes (start a new run in another --output_dir, or resume with the same settings):\n  "
            + "\n  ".join(differences)
        )
