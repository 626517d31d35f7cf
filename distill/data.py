"""Training data for the distillation: image folders, ``datasets`` datasets and prompt files.

Every random choice (crop, flip, caption pick, noise, timestep) is drawn from a generator seeded by
``(seed, stream position, purpose)``, where the stream position is a sample's place in the one global
sequence of training samples. So the data a step sees depends only on the step, not on the number of
processes, the per-process batch size, data-loader workers or a resume:

    global micro-batch m = stream positions [m * P * b, (m + 1) * P * b)   (P processes, b per process)
    process r takes      [m * P * b + r * b, m * P * b + (r + 1) * b)
    stream position p    = epoch p // n, the (p % n)-th index of that epoch's permutation (n samples)

A resume at optimizer step s starts at micro-batch s * gradient_accumulation_steps: nothing is
reshuffled and no sample is repeated or skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

METADATA_FILE = "metadata.jsonl"

# Purposes of the per-sample generators; fixed numbers, part of the data order's definition.
PURPOSE_AUGMENT = 0
PURPOSE_NOISE = 1
PURPOSE_FIDELITY = 2


class DistillInputError(ValueError):
    """Bad input found before training starts; the message names the flag or file at fault."""


def sample_seed(seed: int, position: int, purpose: int) -> int:
    """A 63-bit seed for one sample's generator, from (seed, stream position, purpose)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, position, purpose]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sample_generator(seed: int, position: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, position, purpose))


# ----------------------------------------------------------------------------------------- sources


@dataclass
class Record:
    """One training sample before preprocessing: an image loader (or None) and its caption(s)."""

    caption: str | list[str]
    image: object = None  # a path, a PIL image, or None for prompt-only data


class ImageFolderSource:
    """``train_data_dir/metadata.jsonl`` with one JSON object a line: ``file_name`` and the caption."""

    def __init__(self, root: str, caption_column: str = "text", max_samples: int | None = None):
        root_path = Path(root)
        if not root_path.is_dir():
            raise DistillInputError(f"--train_data_dir {root!r} does not exist or is not a folder")
        metadata = root_path / METADATA_FILE
        if not metadata.is_file():
            raise DistillInputError(
                f"--train_data_dir {root!r} has no {METADATA_FILE}: write one JSON object per image with "
                f'"file_name" and "{caption_column}" (the caption)'
            )
        self.records: list[Record] = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata}, line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise DistillInputError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise DistillInputError(f'{where}: no "file_name"')
            caption = entry.get(caption_column)
            if not _is_caption(caption):
                raise DistillInputError(
                    f'{where}: no caption in column "{caption_column}" (metadata without captions; '
                    "set --caption_column to the column that holds them)"
                )
            image = root_path / entry["file_name"]
            if not image.is_file():
                raise DistillInputError(f"{where}: image file {str(image)!r} does not exist")
            self.records.append(Record(caption, image))
            if max_samples is not None and len(self.records) >= max_samples:
                break
        if not self.records:
            raise DistillInputError(f"--train_data_dir {root!r}: {METADATA_FILE} lists no images")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


class HubDatasetSource:
    """A ``datasets`` dataset (Hub id or local folder; ``pip install gspn-diffusers[train]``)."""

    def __init__(self, args):
        try:
            import datasets
        except ImportError:
            raise DistillInputError(
                "--dataset_name needs the `datasets` package: pip install 'gspn-diffusers[train]'"
            ) from None
        try:
            loaded = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, data_dir=args.train_data_dir
            )
        except Exception as error:  # noqa: BLE001 - any failure to load is a bad --dataset_name
            raise DistillInputError(f"--dataset_name {args.dataset_name!r} could not be loaded: {error}") from error
        split = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
        for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
            if column not in split.column_names:
                raise DistillInputError(
                    f"--dataset_name {args.dataset_name!r} has no column {column!r} ({flag}); "
                    f"its columns are {split.column_names}"
                )
        if args.max_train_samples is not None:
            split = split.select(range(min(args.max_train_samples, len(split))))
        if len(split) == 0:
            raise DistillInputError(f"--dataset_name {args.dataset_name!r} has no samples")
        first = split[0][args.caption_column]
        if not _is_caption(first):
            raise DistillInputError(
                f"--dataset_name {args.dataset_name!r}: column {args.caption_column!r} does not hold captions "
                f"(first value {first!r})"
            )
        self.split = split
        self.image_column = args.image_column
        self.caption_column = args.caption_column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Record:
        row = self.split[index]
        return Record(row[self.caption_column], row[self.image_column])


class PromptsSource:
    """One prompt a line (blank lines skipped); no images: the teacher makes the training latents."""

    def __init__(self, path: str, max_samples: int | None = None):
        file = Path(path)
        if not file.is_file():
            raise DistillInputError(f"--prompts_file {path!r} does not exist")
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise DistillInputError(f"--prompts_file {path!r} holds no prompts")
        self.records = [Record(prompt) for prompt in prompts[:max_samples]]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


def _is_caption(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def open_source(args):
    """The data source the flags name; DistillInputError when none, several, or a bad one is named."""
    named = [flag for flag, value in (("--dataset_name", args.dataset_name), ("--prompts_file", args.prompts_file))
             if value]
    if args.train_data_dir and not args.dataset_name:
        named.append("--train_data_dir")
    if not named:
        raise DistillInputError("no training data: pass --train_data_dir, --dataset_name or --prompts_file")
    if len(named) > 1:
        raise DistillInputError(f"pass one data source, got {' and '.join(named)}")
    if args.prompts_file:
        return PromptsSource(args.prompts_file, args.max_train_samples)
    if args.dataset_name:
        return HubDatasetSource(args)
    return ImageFolderSource(args.train_data_dir, args.caption_column, args.max_train_samples)


# ------------------------------------------------------------------------------------ preprocessing


def sdxl_crop(image, resolution: int, generator: torch.Generator, center_crop: bool, random_flip: bool):
    """SDXL preprocessing of one PIL image.

    Resize the shorter side to ``resolution``, crop a square (centre or random), flip horizontally with
    probability 1/2 when ``random_flip``. Returns (pixels (3, R, R) in [-1, 1], original_size (h, w),
    crop_top_left (top, left)) -- the size/crop conditioning SDXL was trained with.
    Follows preprocess_train of diffusers' train_text_to_image_sdxl.py.
    """
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    draws = torch.rand(3, generator=generator)  # always three draws, so the stream does not depend on flags
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = int(draws[0] * (new_h - resolution + 1))
        left = int(draws[1] * (new_w - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and draws[2] < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = new_w - left - resolution  # the crop's left edge in the flipped image
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, (height, width), (top, left)


class DistillDataset(Dataset):
    """Indexed by (dataset index, stream position); returns one preprocessed sample."""

    def __init__(self, source, resolution: int, seed: int, center_crop: bool = False, random_flip: bool = False):
        self.source = source
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        record = self.source[index]
        generator = sample_generator(self.seed, position, PURPOSE_AUGMENT)
        caption = record.caption
        if isinstance(caption, list):
            caption = caption[int(torch.randint(len(caption), (1,), generator=generator))]
        item = dict(prompt=caption, position=position)
        if record.image is None:
            size = (self.resolution, self.resolution)
            item.update(pixel_values=None, original_size=size, crop_top_left=(0, 0))
            return item
        image = record.image
        if isinstance(image, (str, Path)):
            from PIL import Image

            with Image.open(image) as opened:
                image = opened.convert("RGB")
        pixels, original_size, crop = sdxl_crop(
            image, self.resolution, generator, self.center_crop, self.random_flip
        )
        item.update(pixel_values=pixels, original_size=original_size, crop_top_left=crop)
        return item


def collate(items: list[dict]) -> dict:
    pixels = [item["pixel_values"] for item in items]
    return dict(
        pixel_values=None if pixels[0] is None else torch.stack(pixels),
        prompts=[item["prompt"] for item in items],
        positions=[item["position"] for item in items],
        original_sizes=[item["original_size"] for item in items],
        crop_top_lefts=[item["crop_top_left"] for item in items],
    )


class StreamBatchSampler(Sampler):
    """This process's micro-batches of (index, stream position), forever, from micro-batch ``start``.

    See the module docstring for the order. Each epoch is a fresh permutation seeded by (seed, epoch),
    so the order is the same whenever and wherever it is computed.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_micro_batch: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start_micro_batch
        self.shuffle = shuffle
        self._epoch, self._perm = None, None

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, PURPOSE_AUGMENT + 100))
            self._perm = torch.randperm(self.num_samples, generator=generator).tolist()
            self._epoch = epoch
        return self._perm[offset]

    def positions(self, micro_batch: int) -> range:
        first = (micro_batch * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def __iter__(self):
        micro_batch = self.start
        while True:
            yield [(self.index_at(p), p) for p in self.positions(micro_batch)]
            micro_batch += 1


def make_dataloader(dataset: DistillDataset, batch_size: int, rank: int, world_size: int, seed: int,
                    start_micro_batch: int, num_workers: int = 0) -> DataLoader:
    sampler = StreamBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_micro_batch)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def fidelity_items(dataset: DistillDataset, count: int) -> dict:
    """A fixed batch for the fidelity report: the first ``count`` samples, centre-cropped, not flipped."""
    held = DistillDataset(dataset.source, dataset.resolution, dataset.seed, center_crop=True, random_flip=False)
    items = [held[(index % len(held), index)] for index in range(count)]
    return collate(items)
