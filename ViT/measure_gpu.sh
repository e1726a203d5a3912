#!/usr/bin/env bash
# Every GPU measurement the project reports, in one run sized for one device lease. From the
# repository root, with the shared data copied into the ignored data/ folder (carry `data`):
#   mkdir -p data && cp -r ../shared/data/imagenet-sample-40 ../shared/data/imagenette-128 data/
#   [STUDY_MINUTES=N | STUDY_UNTIL=S] [GPU_TESTS=0] [COMPILE=0] bash ViT/measure_gpu.sh [out_dir]
#   (out_dir default: $OUT, else gpu_measure_out); ONLY_STUDY=1 with STUDY_MINUTES or STUDY_UNTIL
#   runs the study stage alone (e.g. a GPU session that has the performance figures already).
# Measured on an H200 with 16 CPU cores (2026-11-28): stages 0-6 in 552 s (0: 24 s, 1: 133, 2: 42,
# 3: 172, 4: 32, 5: 9, 6: 140), so they fit one 600 s device call; the study needs its own.
#   1. upstream reference vs the project step with k = 0..L-1 frozen; each input backend alone
#      and feeding the step, the gpu backend also with 25% and 50% of each batch decoded by the
#      CPU workers (ViT-B/16, 224 px, batch 256, imagenet-sample-40 repeated to 100 batches an
#      epoch);
#   2. Imagenette-128: synthetic-input step vs a real run_pretrain.py run with gpu-cache;
#   3. unless COMPILE=0: the project step under torch.compile at k = 0, 4, 8, 12 (one compile
#      each; the schedule average interpolates the other k);
#   4. the gpu backend decoding on the training thread (--decode_ahead 0), for comparison;
#   5. the performance targets checked (summary.md; `benchmark.py --check_targets DIR` redoes it
#      from an unpacked measure_gpu.tgz, e.g. when a later stage was cut short);
#   6. unless GPU_TESTS=0: the GPU integration tests (tests/test_gpu_paths.py);
#   7. with STUDY_MINUTES=N: study.py for at most N minutes, continuing image/study_results.json
#      in <out>/study/ (updated after every run; run logs in <out>/study_logs.tgz; the runs'
#      checkpoints in study_out/gpu_runs, or STUDY_RUNS, kept for a later call); with
#      STUDY_UNTIL=S instead, for whatever is left until S seconds after this script started
#      (fills one device call: e.g. STUDY_UNTIL=560 under a 590 s limit).
# The device tool returns at most 8 files: everything is packed after every stage into
# <out>/measure_gpu.tgz, and the console goes in full to <out>/console.txt, so a run cut short
# keeps what it measured. DATA=<folder> replaces data/; VIT_PYTHON=<command> starts every Python
# it runs (default python3; e.g. `numactl --cpunodebind=0 python3`); QUICK=1 shrinks everything to a
# CPU-sized smoke run of this script (tests/test_measure_gpu.py; the GPU tests skip there).
set -uo pipefail
here=$(realpath "$(dirname "$0")")
out=$(realpath -m "${1:-${OUT:-$here/../gpu_measure_out}}")
data=$(realpath -m "${DATA:-$here/../data}")
# what starts every Python this script runs, as demo.py and study.py read it (util/cli.py's
# python_command); a relative path is resolved before the cd
read -ra python <<< "${VIT_PYTHON:-}"
[ ${#python[@]} = 0 ] && python=(python3)  # unset or blank
[[ ${python[0]} == */* ]] && python[0]=$(realpath -m "${python[0]}")
cd "$here"
work=$(mktemp -d "${TMPDIR:-/tmp}/measure_gpu.XXXXXX")
mkdir -p "$out"
exec > >(tee -a "$out/console.txt") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1
needed=("$data/imagenette-128/train")
[ "${ONLY_STUDY:-0}" != 1 ] && needed+=("$data/imagenet-sample-40")  # the study reads Imagenette only
for d in "${needed[@]}"; do
  if [ ! -d "$d" ]; then
    echo "error: $d is missing; copy the shared data first (see the top of $0)"; exit 2
  fi
done
if ! command -v "${python[0]}" >/dev/null; then
  echo "error: VIT_PYTHON='${VIT_PYTHON:-}': ${python[0]} is not a command that can be started"; exit 2
fi
study_s=0
if [ "${ONLY_STUDY:-0}" = 1 ] && [ -z "${STUDY_MINUTES:-}${STUDY_UNTIL:-}" ]; then
  echo "error: ONLY_STUDY=1 needs STUDY_MINUTES=N or STUDY_UNTIL=S (how long the study may run)"; exit 2
fi
if [ -n "${STUDY_MINUTES:-}" ] && [ -n "${STUDY_UNTIL:-}" ]; then
  echo "error: give STUDY_MINUTES or STUDY_UNTIL, not both"; exit 2
fi
if [ -n "${STUDY_UNTIL:-}" ] && ! [[ "$STUDY_UNTIL" =~ ^(0|[1-9][0-9]*)$ ]]; then  # no leading 0: octal in $(( ))
  echo "error: STUDY_UNTIL must be whole seconds after the start, got '$STUDY_UNTIL'"; exit 2
fi
if [ -n "${STUDY_MINUTES:-}" ]; then
  if ! study_s=$("${python[@]}" -c 'import sys; m = float(sys.argv[1]); assert m >= 0; print(max(1, round(m * 60)) if m else 0)' "$STUDY_MINUTES" 2>/dev/null); then
    echo "error: STUDY_MINUTES must be a number of minutes, got '$STUDY_MINUTES'"; exit 2
  fi
fi
if [ "${QUICK:-0}" = 1 ]; then
  dev=cpu; model=MIM_vit_tiny_patch16; size=64; batch=8; steps="--steps 2 --warmup 1"; repeat=2; workers=2
  small_batch=8; small_workers=2; epochs=1; backend=pil; study_flags="--quick --device cpu"
  compile_flags="--compile --compile_backend eager --ks 0 12"  # dynamo without code generation, 2 graphs
else
  dev=cuda; model=MIM_vit_base_patch16; size=224; batch=256; steps="--steps 20 --warmup 5"; repeat=640; workers=15
  small_batch=256; small_workers=8; epochs=3; backend=gpu-cache; study_flags=""
  compile_flags="--compile --ks 0 4 8 12"
fi
cap="timeout -k 10 300"
stage() { echo; echo "== $(date +%T) [+${SECONDS}s] $*"; }
pack() { tar czf "$out/measure_gpu.tgz" -C "$work" --exclude='*.pth' --exclude='events.out.*' . ; }
# a time limit's TERM mid-stage: pack what the stage has written so far (benchmark.json is
# rewritten after every timed k) before stopping; pack first, as the console's tee may be gone
trap 'pack; trap "" PIPE; echo "stopped by a signal: packed what was measured" 2>/dev/null; exit 143' TERM INT

if [ "${ONLY_STUDY:-0}" != 1 ]; then  # stages 0-6; ONLY_STUDY=1 goes straight to the study
stage "0. environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "cpus: $(nproc); open files: $(ulimit -n); /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2 " total, " $4 " free"}')"
  "${python[@]}" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)'
  if [ "$dev" = cuda ]; then  # does nvjpeg decode here? a refusal would make the gpu backend a CPU decoder
    "${python[@]}" - "$data/imagenet-sample-40" <<'PY'
import glob, sys
import torch
from torchvision.io import ImageReadMode, decode_jpeg, read_file
files = sorted(glob.glob(sys.argv[1] + '/**/*.JPEG', recursive=True))[:16]
try:
    out = decode_jpeg([read_file(f) for f in files], mode=ImageReadMode.RGB, device='cuda')
    torch.cuda.synchronize()
    print(f'nvjpeg: decoded {len(out)} JPEGs in one batch on {torch.cuda.get_device_name()}')
except Exception as e:
    print(f'nvjpeg: FAILED ({type(e).__name__}: {e}); the gpu backend will decode on the CPU')
PY
  fi
} 2>&1 | tee "$work/env.txt"

stage "1. step: upstream reference vs project step with k frozen (cubic 0.8); loaders alone and feeding the step"
$cap "${python[@]}" benchmark.py --device $dev --model $model --input_size $size --batch_size $batch $steps \
  --how_scale cubic --t_0 0.8 --data_path "$data/imagenet-sample-40" --repeat $repeat --num_workers $workers \
  --cpu_decode_shares 0 0.25 0.5 --out "$work/b16_224"
pack

stage "2. Imagenette-128: synthetic-input step vs a real run_pretrain.py run with $backend"
$cap "${python[@]}" benchmark.py --device $dev --model $model --input_size 128 --batch_size $small_batch $steps \
  --ks 0 --skip_reference --out "$work/imagenette_step"
$cap "${python[@]}" run_pretrain.py --device $dev --model $model --input_size 128 --batch_size $small_batch \
  --epochs $epochs --warmup_epochs 1 --data_backend $backend --data_path "$data/imagenette-128" \
  --output_dir "$work/imagenette_run" --no_auto_resume --print_freq 1000 --num_workers $small_workers
pack

if [ "${COMPILE:-1}" != 0 ]; then
  stage "3. the project step under torch.compile (k = 0, 4, 8, 12)"
  $cap "${python[@]}" benchmark.py --device $dev --model $model --input_size $size --batch_size $batch $steps \
    --how_scale cubic --t_0 0.8 --skip_reference $compile_flags --out "$work/b16_224_compile"
  pack
fi

stage "4. gpu backend decoding on the training thread (--decode_ahead 0), for comparison"
$cap "${python[@]}" benchmark.py --device $dev --model $model --input_size $size --batch_size $batch $steps \
  --ks 0 --skip_reference --backends gpu --decode_ahead 0 --e2e_ks 0 --data_path "$data/imagenet-sample-40" \
  --repeat $repeat --num_workers $workers --out "$work/b16_224_decode_inline"
pack

stage "5. targets"
"${python[@]}" benchmark.py --check_targets "$work" | tee "$work/summary.md"
pack

if [ "${GPU_TESTS:-1}" != 0 ]; then
  stage "6. GPU integration tests"
  (cd .. && timeout -k 10 420 "${python[@]}" -m pytest -q -rs --tb=short --durations=0 tests/test_gpu_paths.py) 2>&1 \
    | tee "$work/gpu_tests.txt"
  pack
fi
fi  # stages 0-6

if [ -n "${STUDY_UNTIL:-}" ]; then
  study_s=$(( STUDY_UNTIL - SECONDS ))
  if [ "$study_s" -lt 30 ]; then
    echo; echo "== no time left for the study (STUDY_UNTIL=$STUDY_UNTIL, now +${SECONDS}s)"; study_s=0
  fi
  STUDY_MINUTES=$("${python[@]}" -c "print(round($study_s / 60, 2))")
fi
if [ "${ONLY_STUDY:-0}" = 1 ] && [ "$study_s" = 0 ]; then
  echo "error: ONLY_STUDY=1 but no time for the study (STUDY_MINUTES=${STUDY_MINUTES:-}, STUDY_UNTIL=${STUDY_UNTIL:-})"
  rm -rf "$work"; exit 2
fi
if [ "$study_s" != 0 ]; then
  stage "7. study (at most $STUDY_MINUTES minutes; results in $out/study/)"
  # on a GPU the runs (checkpoints) go to the git-ignored study_out/, which a warm machine keeps
  # between device calls: a later call can fine-tune a config pretrained in this one without
  # pretraining it again
  runs="$work/study_runs"
  [ "${QUICK:-0}" != 1 ] && runs="$here/../study_out/gpu_runs"
  runs="${STUDY_RUNS:-$runs}"
  mkdir -p "$out/study" "$runs"
  [ "${QUICK:-0}" != 1 ] && [ -f ../image/study_results.json ] && cp ../image/study_results.json "$out/study/"
  # a run may outlast --max_minutes' estimate: stop it in time to pack the logs (STUDY_UNTIL is a hard end)
  limit=$(( study_s + 120 ))
  [ -n "${STUDY_UNTIL:-}" ] && limit=$(( STUDY_UNTIL + 15 - SECONDS ))
  timeout -k 5 $limit "${python[@]}" study.py $study_flags --data_path "$data/imagenette-128" \
    --out "$runs" --results "$out/study/study_results.json" --max_minutes "$STUDY_MINUTES"
  tar czf "$out/study_logs.tgz" -C "$(dirname "$runs")" --exclude='*.pth' --exclude='events.out.*' \
    "$(basename "$runs")"
fi

stage "done: results in $out"
rm -rf "$work"
exec >&- 2>&-
wait "$tee_pid"
