"""Checkpoints that survive a kill: written to a hidden temporary folder, then renamed into place.

    output_dir/.checkpoint-N.tmp   being written (accelerate's save_state, training_state.json, gspn/)
    output_dir/checkpoint-N        complete: renamed from the temporary folder in one os.replace
    output_dir/gspn                the latest exported adapter, swapped in the same way

    output_dir/train_log.jsonl     one line per optimizer step
    output_dir/validation, output_dir/<--logging_dir>   validation images, tracker logs

A kill at any moment leaves every ``checkpoint-N`` either absent or complete, so ``latest`` always
finds a usable one. Old checkpoints are pruned (``--checkpoints_total_limit``) only after the new one
is in place. A folder counts as a checkpoint only when it holds ``training_state.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "training_state.json"
ADAPTER_FOLDER = "gspn"
LOG_FILE = "train_log.jsonl"
VALIDATION_FOLDER = "validation"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``latest`` (None if there is none) or a path."""
    # Follows the resume_from_checkpoint handling of diffusers' train_text_to_image_sdxl.py ("latest", checkpoint-N).
    if not value:
        return None
    if value == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / value  # diffusers accepts a bare "checkpoint-N" inside output_dir
    return path


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _replace_dir(source: Path, target: Path) -> None:
    """Put ``source`` at ``target``; an existing ``target`` is moved aside first and removed after."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def finalize(output_dir: str | Path, step: int, state: dict, total_limit: int | None) -> Path:
    """Main process, after every process wrote into ``temporary_dir``: seal, rename, publish, prune."""
    output_dir = Path(output_dir)
    tmp = temporary_dir(output_dir, step)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = output_dir / f"checkpoint-{step}"
    _replace_dir(tmp, final)
    if (final / ADAPTER_FOLDER).is_dir():
        publish_adapter(final / ADAPTER_FOLDER, output_dir)
    if total_limit is not None:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def publish_adapter(folder: str | Path, output_dir: str | Path) -> Path:
    """Copy an exported adapter folder (and the fidelity report beside it) to ``output_dir/gspn``, atomically."""
    output_dir = Path(output_dir)
    staging = output_dir / f".{ADAPTER_FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging)
    target = output_dir / ADAPTER_FOLDER
    _replace_dir(staging, target)
    return target


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Tidy up after a save that was killed (called at the start of a run, main process).

    ``.X.tmp`` folders were never complete: removed. ``.X.old`` is the previous ``X`` moved aside by
    ``_replace_dir``: put back if the kill came before the new ``X`` was in place, removed otherwise.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        name = child.name
        if not name.startswith((".checkpoint-", f".{ADAPTER_FOLDER}.")):
            continue
        if name.endswith(".tmp"):
            shutil.rmtree(child, ignore_errors=True)
        elif name.endswith(".old"):
            original = root / name[1:-len(".old")]
            if original.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                os.replace(child, original)


def run_files(output_dir: str | Path, logging_dir: str) -> list[Path]:
    """What a run wrote into ``output_dir`` (files of other origin, e.g. a prompts file, are not listed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    named = {LOG_FILE, ADAPTER_FOLDER, VALIDATION_FOLDER}
    if not Path(logging_dir).is_absolute():
        named.add(Path(logging_dir).parts[0])
    return sorted(
        child for child in root.iterdir()
        if child.name in named or _CHECKPOINT.match(child.name)
        or child.name.startswith((".checkpoint-", f".{ADAPTER_FOLDER}."))
    )


def remove_run(output_dir: str | Path, logging_dir: str) -> list[Path]:
    """Delete what a run wrote into ``output_dir`` (``--overwrite_output_dir``); returns what was removed."""
    removed = run_files(output_dir, logging_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed
