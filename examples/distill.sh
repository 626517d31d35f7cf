#!/usr/bin/env bash
# Distil a GSPN-2 adapter for SDXL (distill/distill_sdxl.py). Copy the command you need.
#
#   bash examples/distill.sh 8gpu     # a real distillation on 8 GPUs (one node)
#   bash examples/distill.sh 1gpu     # the same run on 1 GPU: same global batch, same data order, same result
#   bash examples/distill.sh smoke    # CPU, no weights: the tiny random SDXL, 3 steps at 64^2 (about a minute)
#   bash examples/distill.sh bench1   # benchmark: random full-size SDXL, bf16, 1024^2, batch 1, 1 GPU, ~4 min
#   bash examples/distill.sh bench2   # the same on 2 GPUs (DDP, 1 sample per GPU)
#   bash examples/distill.sh bench2ref  # then: 1 GPU, 1 sample x 2 accumulation steps, to the step bench2 reached,
#                                      # and compare_adapters on the two exported adapters
#
# MODEL: an SDXL pipeline (Hub id or folder); DATA: an image folder with metadata.jsonl ({"file_name", "text"}
# per line), or set PROMPTS to a text file of prompts (one a line) to train on latents the teacher makes.
# Re-running the same command continues from the latest checkpoint (--resume_from_checkpoint latest) with the
# same settings; a resume that changes a run-defining flag is refused. The benchmarks (benchmarks/bench_distill.py)
# start anew each time (--overwrite_output_dir).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
DATA=${DATA:-data/sdxl-images}
PROMPTS=${PROMPTS:-}
OUT=${OUT:-runs/gspn-sdxl}
SCRIPT=distill/distill_sdxl.py
BENCH_SCRIPT=benchmarks/bench_distill.py
if [[ -n "$PROMPTS" ]]; then SOURCE=(--prompts_file "$PROMPTS"); else SOURCE=(--train_data_dir "$DATA"); fi

# What every real run shares. Global batch 16 = processes x --train_batch_size x --gradient_accumulation_steps.
COMMON=(
  --pretrained_model_name_or_path "$MODEL" "${SOURCE[@]}" --output_dir "$OUT"
  --resolution 1024 --random_flip --mixed_precision bf16 --gradient_checkpointing --allow_tf32
  --proxy_ratio 8 --gate_groups 1
  --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 500
  --layerwise_steps 2000 --max_train_steps 20000
  --noise_loss_weight 1.0 --kd_loss_weight 1.0 --feature_loss_weight 1.0
  --checkpointing_steps 1000 --checkpoints_total_limit 3 --resume_from_checkpoint latest
  --validation_prompt "a lighthouse on a cliff at dawn, highly detailed photograph" --validation_steps 1000
  --fidelity_timesteps 4 --report_to tensorboard
)

# Benchmark: no weights needed (random SDXL base-1.0 architecture built on the GPU in bf16, byte tokenizers),
# prompts only (the teacher makes the latents in 4 Euler steps). Writes seconds/step, peak memory per GPU and
# the per-layer feature loss of the first and last step to $OUT/benchmark.json.
# the prompts file lies beside the output folder: <out>.prompts.txt
bench_prompts() {
  mkdir -p "$(dirname "$1")"
  printf '%s\n' "a lighthouse at dawn" "a red bicycle against a brick wall" "mountains in fog" \
    "a bowl of fruit on a wooden table" "a city street at night in the rain" "a cat asleep on a sofa" > "$1.prompts.txt"
}
BENCH=(
  --random_sdxl full --resolution 1024 --mixed_precision bf16 --gradient_checkpointing --allow_tf32
  --teacher_sampling_steps 4 --learning_rate 1e-3 --max_train_steps 1000 --max_train_seconds "${BENCH_SECONDS:-180}"
  --checkpointing_steps 100000 --fidelity_timesteps 4 --seed 0 --overwrite_output_dir
)

case "${1:-}" in
  8gpu)
    accelerate launch --multi_gpu --num_processes 8 "$SCRIPT" "${COMMON[@]}" \
      --train_batch_size 2 --gradient_accumulation_steps 1 --dataloader_num_workers 4
    ;;
  1gpu)
    accelerate launch --num_processes 1 "$SCRIPT" "${COMMON[@]}" \
      --train_batch_size 2 --gradient_accumulation_steps 8 --dataloader_num_workers 4
    ;;
  smoke)
    OUT=${OUT%/}-smoke; bench_prompts "$OUT"
    python "$SCRIPT" --random_sdxl tiny --prompts_file "$OUT.prompts.txt" --output_dir "$OUT" --overwrite_output_dir \
      --resolution 64 --teacher_sampling_steps 2 --teacher_guidance_scale 1 --max_train_steps 3 --layerwise_steps 1 \
      --checkpointing_steps 3 --fidelity_timesteps 1 --learning_rate 1e-3
    ;;
  bench1)
    OUT=${OUT%/}-bench1; bench_prompts "$OUT"
    accelerate launch --num_processes 1 --mixed_precision bf16 "$BENCH_SCRIPT" "${BENCH[@]}" \
      --prompts_file "$OUT.prompts.txt" --output_dir "$OUT" --train_batch_size 1 --benchmark_json "$OUT/benchmark.json"
    ;;
  bench2)
    # NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
    OUT2=${OUT%/}-bench2; bench_prompts "$OUT2"
    NCCL_NVLS_ENABLE=0 accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 "$BENCH_SCRIPT" \
      "${BENCH[@]}" --prompts_file "$OUT2.prompts.txt" --output_dir "$OUT2" --train_batch_size 1 \
      --benchmark_json "$OUT2/benchmark.json"
    ;;
  bench2ref)
    # After bench2: one GPU, same global batch (1 sample x 2 accumulation steps), so the same data order, run
    # to the step bench2 reached; then compare the two exported adapters.
    OUT2=${OUT%/}-bench2; OUT1=${OUT%/}-bench2-reference; bench_prompts "$OUT1"
    STEPS=$(python -c "import json; print(json.load(open('$OUT2/benchmark.json'))['final_step'])")
    accelerate launch --num_processes 1 --mixed_precision bf16 "$BENCH_SCRIPT" "${BENCH[@]}" \
      --prompts_file "$OUT1.prompts.txt" --output_dir "$OUT1" --train_batch_size 1 --gradient_accumulation_steps 2 \
      --max_train_steps "$STEPS" --max_train_seconds 100000 --benchmark_json "$OUT1/benchmark.json"
    python -m gspn_diffusers.distill.compare_adapters "$OUT1/gspn" "$OUT2/gspn" --initial "$OUT2/gspn-initial"
    ;;
  *)
    sed -n '2,17p' "$0"; exit 2
    ;;
esac
