"""Distillation speed, memory and learning: distill_sdxl.py driven through its public steps, timed.

    accelerate launch benchmarks/bench_distill.py <distill_sdxl.py flags> --benchmark_json out.json \
        [--max_train_seconds 180]
    bash examples/distill.sh bench1 | bench2 | bench2ref      # the commands of the published table

Adds to the distillation: ``--max_train_seconds`` (stop, and save, once this much wall time was spent
training; the processes agree on the mean), the adapter before training written to
``output_dir/gspn-initial`` (what ``compare_adapters --initial`` measures training changes against), the
fidelity report before training, and ``--benchmark_json``: seconds per step (median after the first
steps, which build caches and kernels), input-preparation seconds per step, peak memory per process,
and the per-layer feature loss of the first and last step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from gspn_diffusers.distill import checkpoints
from gspn_diffusers.distill.args import build_parser, parse_args, positive_float
from gspn_diffusers.distill.data import DistillInputError
from gspn_diffusers.distill.distill_sdxl import Distiller, setup


class TimedDistiller(Distiller):
    """A Distiller that also adds up the seconds spent preparing inputs (text encoding, noising, latents)."""

    data_seconds = 0.0

    def make_inputs(self, *args, **kwargs):
        start = time.perf_counter()
        inputs = super().make_inputs(*args, **kwargs)
        self.data_seconds += time.perf_counter() - start
        return inputs


class Benchmark:
    """Training callbacks (see ``Distiller.train``) that keep the benchmark's bookkeeping."""

    def __init__(self, max_train_seconds: float | None):
        self.max_train_seconds = max_train_seconds
        self.step_seconds, self.data_seconds, self.records = [], [], []
        self.setup_peak_gib, self.fidelity_start, self.final_step, self.peaks = 0.0, None, None, []

    def on_train_begin(self, distiller, step: int) -> None:
        if distiller.accelerator.is_main_process:
            if step == 0:  # what both runs of a 1-vs-N-process comparison start from (compare_adapters.py)
                distiller.adapter.save_pretrained(Path(distiller.args.output_dir) / "gspn-initial")
            self.fidelity_start = distiller.fidelity()
        distiller.accelerator.wait_for_everyone()
        if distiller.device.type == "cuda":
            self.setup_peak_gib = torch.cuda.max_memory_allocated(distiller.device) / 2**30
            torch.cuda.reset_peak_memory_stats(distiller.device)
        self._data_before, self._step_start = distiller.data_seconds, time.perf_counter()

    def on_step_end(self, distiller, record: dict) -> bool:
        if distiller.device.type == "cuda":
            torch.cuda.synchronize(distiller.device)
        now = time.perf_counter()
        self.step_seconds.append(now - self._step_start)
        self.data_seconds.append(distiller.data_seconds - self._data_before)
        self.records.append(record)
        out_of_time = self.max_train_seconds is not None and record["elapsed_s"] >= self.max_train_seconds
        if out_of_time:
            distiller.accelerator.print(
                f"--max_train_seconds {self.max_train_seconds} reached at step {record['step']}")
        self._data_before, self._step_start = distiller.data_seconds, time.perf_counter()  # checkpoints excluded
        return out_of_time

    def on_train_end(self, distiller, step: int) -> None:
        self.final_step = step
        device = distiller.device
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        self.peaks = distiller.accelerator.gather(torch.tensor([peak], device=device)).tolist()  # every process

    def result(self, distiller) -> dict | None:
        """The benchmark's numbers (main process), None if no step ran."""
        args, accelerator = distiller.args, distiller.accelerator
        steps = self.step_seconds
        if not steps:
            return None
        timed = steps[2:] if len(steps) > 4 else steps[1:] or steps  # the first steps build caches and kernels
        median = sorted(timed)[len(timed) // 2]
        data = sorted(self.data_seconds[-len(timed):])[len(timed) // 2]
        report_path = Path(args.output_dir) / checkpoints.ADAPTER_FOLDER / "fidelity_report.json"
        final_report = json.loads(report_path.read_text()) if report_path.exists() else None
        first, last = self.records[0], self.records[-1]

        def feature_loss(record):
            return dict(step=record["step"], stage=record["stage"], mean=record["feature_loss"],
                        per_layer=dict(zip(distiller.layers, record["layer_feature_loss"])))

        return dict(
            device=torch.cuda.get_device_name(distiller.device) if distiller.device.type == "cuda" else "cpu",
            num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
            model=args.pretrained_model_name_or_path or f"random {args.random_sdxl} SDXL",
            resolution=args.resolution, train_batch_size=args.train_batch_size,
            global_batch_size=distiller.global_batch_size, gradient_checkpointing=args.gradient_checkpointing,
            layers=distiller.layers, steps_run=len(steps), final_step=self.final_step,
            seconds_per_step=median, steps_per_second=1.0 / median, data_seconds_per_step=data,
            step_seconds=steps, peak_memory_gib_per_process=self.peaks, setup_peak_memory_gib_main=self.setup_peak_gib,
            gspn_backend="cuda" if distiller.device.type == "cuda" else "reference",
            feature_loss_first_step=feature_loss(first), feature_loss_last_step=feature_loss(last),
            fidelity_start=(self.fidelity_start or {}).get("mean"), fidelity_end=(final_report or {}).get("mean"),
        )


def main(argv=None) -> dict | None:
    parser = build_parser()
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark_json", type=str, required=True, help="where the numbers go")
    bench.add_argument("--max_train_seconds", type=positive_float, default=None,
                       help="also stop (and save) once this much wall time was spent training")
    args = parse_args(argv, parser)
    benchmark_json, max_train_seconds = args.benchmark_json, args.max_train_seconds
    del args.benchmark_json, args.max_train_seconds  # not distillation settings (a resume may change them)
    distiller, resume = setup(args, TimedDistiller)
    benchmark = Benchmark(max_train_seconds)
    distiller.train(resume, callbacks=[benchmark])
    result = None
    if distiller.accelerator.is_main_process:
        result = benchmark.result(distiller)
        if result is None:
            print(f"benchmark: no step ran (the run was already at step {benchmark.final_step}); "
                  f"{benchmark_json} not written")
        else:
            Path(benchmark_json).parent.mkdir(parents=True, exist_ok=True)
            Path(benchmark_json).write_text(json.dumps(result, indent=2))
            first, last = result["feature_loss_first_step"], result["feature_loss_last_step"]
            print(f"benchmark: {result['seconds_per_step']:.3f} s/step, peak {max(benchmark.peaks):.1f} GiB, "
                  f"feature loss {first['mean']:.4g} (step {first['step']}) -> {last['mean']:.4g} (step "
                  f"{last['step']}); wrote {benchmark_json}", flush=True)
    distiller.accelerator.wait_for_everyone()
    distiller.accelerator.end_training()
    return result


if __name__ == "__main__":
    try:
        main()
    except DistillInputError as error:
        sys.exit(f"bench_distill.py: error: {error}")
