#!/usr/bin/env bash
# Every GPU measurement the project reports, in one run (for a lent GPU, ~6-8 minutes on an H100).
# From the repository root, with the shared data copied into the ignored data/ folder:
#   mkdir -p data && cp -r ../shared/data/imagenet-sample-40 ../shared/data/imagenette-128 data/
#   bash ViT/measure_gpu.sh [out_dir]          (default: $OUT, else gpu_measure_out)
# QUICK=1 shrinks everything to a CPU-sized smoke run of the script itself.
set -uo pipefail
cd "$(dirname "$0")"
out=$(realpath -m "${1:-${OUT:-../gpu_measure_out}}")
mkdir -p "$out"
data=../data
export PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then
  dev=cpu; model=MIM_vit_tiny_patch16; size=64; batch=8; steps="--steps 2 --warmup 1"; repeat=1
  small_model=MIM_vit_tiny_patch16; small_batch=8; epochs=1
else
  dev=cuda; model=MIM_vit_base_patch16; size=224; batch=256; steps="--steps 20 --warmup 5"; repeat=64
  small_model=MIM_vit_base_patch16; small_batch=256; epochs=3
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)'
} | tee "$out/env.txt"

echo "== 1. step: upstream reference vs project step with k frozen, cubic 0.8 schedule; loaders on full-size JPEGs"
python3 benchmark.py --device $dev --model $model --input_size $size --batch_size $batch $steps \
  --how_scale cubic --t_0 0.8 --data_path $data/imagenet-sample-40 --repeat $repeat --num_workers 15 \
  --out "$out/b16_224" 2>&1 | tail -40

echo "== 2. same for linear 0.5 (step timings only for the schedule average)"
python3 benchmark.py --device $dev --model $model --input_size $size --batch_size $batch $steps \
  --how_scale linear --t_0 0.5 --skip_reference --out "$out/b16_224_linear" 2>&1 | tail -8

echo "== 3. Imagenette-128: synthetic-input step vs a real run_pretrain.py epoch with gpu-cache"
python3 benchmark.py --device $dev --model $small_model --input_size 128 --batch_size $small_batch $steps \
  --ks 0 --skip_reference --out "$out/imagenette_step" 2>&1 | tail -8
backend=gpu-cache; [ "$dev" = cpu ] && backend=pil
python3 run_pretrain.py --device $dev --model $small_model --input_size 128 --batch_size $small_batch \
  --epochs $epochs --warmup_epochs 1 --data_backend $backend --data_path $data/imagenette-128 \
  --output_dir "$out/imagenette_run" --no_auto_resume --print_freq 1000 --num_workers 8 2>&1 | tail -8
cp "$out/imagenette_run/log.txt" "$out/imagenette_run_log.txt" 2>/dev/null
rm -f "$out"/imagenette_run/*.pth
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
step = json.load(open(f'{out}/imagenette_step/benchmark.json'))['freeze_img_per_s'][0]
epochs = [json.loads(l) for l in open(f'{out}/imagenette_run/log.txt')]
real = epochs[-1]['train_images_per_s']
print(f'imagenette-128: synthetic step {step:.0f} img/s, real epoch {real:.0f} img/s '
      f'({real / step:.1%} of the synthetic step)')
PY
