#!/usr/bin/env bash
# The GPU check: every CUDA path of the project run and measured on a bare GPU machine,
# one step per call. Every command has its own time cap, and the whole call stops
# starting commands when its budget ($GPU_CHECK_BUDGET, default 560 s) is spent, so a
# call never runs into the device tool's 10 minutes. bench/GPU.md has the procedure
# (bench/gpu_prepare.sh first, on a machine with pip access).
#
#   bash bench/gpu_check.sh OUT_DIR [STEP[,STEP...]]
#
# Steps, in the order to run them:
#   suite    the machine, the CPU suite with the GPU hidden, then the CUDA tests alone
#   bench    matrix and copy ceilings; bench.py training/inference on synthetic tensors,
#            reference loop and every speed flag at batch 128, bf16 variants at 256
#   e2e      AVA-like JPEGs and their 256 cache; bench.py end to end from the files
#            (loader, training, inference; 16 workers; loader wait per step)
#   infer    test.py on 10,000 cached JPEGs (and the originals), per loader path
#   train    main.py with CUDA defaults for 3 epochs, then under torchrun (one process)
#   parity   CUDA vs CPU predictions of one checkpoint: test.py and main.py --test,
#            bf16 (the CUDA default) and float32 (--amp off)
#   compile  main.py --compile for 3 epochs with compilations counted per epoch,
#            --resume of it, test.py on the result
#   serve    serve.py on the device under 1, 8 and 32 clients beside the model called
#            directly in batches (bench/serve_load.py)
#   profile  (optional) torch.profiler over training steps fed by the real loader
# Several steps in one call (STEP,STEP) run until the budget is spent; the ones left
# are recorded as not run. No STEP: all but profile, which takes several calls' time.
#
# Writes into OUT_DIR: <date>_<card>.jsonl (one JSON record per check; append it to
# bench/results/<date>_<card>.jsonl), gpu_check.log (this script's output) and
# <steps>_logs.tar.gz (every command's full log). Environment: PYTHON (python3),
# GPU_CHECK_DATA (/tmp/nima_gpu_check: data, checkpoints, logs; reused by later steps
# while the machine stays up), GPU_CHECK_WHEELS (.gpu_wheels), SMOKE=1 (the plumbing
# on a CPU: tiny_cnn, a few dozen images, device cpu; no figure means anything).
#
# Never runs `make` or tools/check_requirements.py: they insist on the pinned torch,
# and the GPU machine has its own.
set -uo pipefail  # no -e: a check that fails is recorded, and the step goes on

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [STEP[,STEP...]]}
STEPS=${2:-suite,bench,e2e,infer,train,parity,compile,serve}
BUDGET=${GPU_CHECK_BUDGET:-560}  # seconds for this whole call; $SECONDS counts from the start
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DATA=${GPU_CHECK_DATA:-/tmp/nima_gpu_check}
WHEELS=${GPU_CHECK_WHEELS:-.gpu_wheels}
SMOKE=${SMOKE:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$DATA/logs"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu MODEL=tiny_cnn IMAGES=48 TRAIN=24 VAL=12 TEST=16 WORKERS=2 EPOCHS=2 BATCH=8 PARITY=8 INFER_IMAGES=16
  BENCH_ARGS=(--quick) SUITE_FILES=(tests/test_device_preprocess.py) CUDA_FILES=(tests/test_cuda_paths.py)
  TRAIN_EXTRA="--train_batch_size 8 --val_batch_size 8"  # a few steps per epoch from 24 images
  SERVE_ARGS=(--quick)
else
  DEVICE=cuda MODEL=vgg16 IMAGES=10000 TRAIN=4000 VAL=1000 TEST=1000 WORKERS=16 EPOCHS=3 BATCH=128 PARITY=128
  INFER_IMAGES=4096
  BENCH_ARGS=(--steps 30 --warmup 5) SUITE_FILES=(tests)
  CUDA_FILES=(tests/test_cuda_paths.py tests/test_device_preprocess.py)
  TRAIN_EXTRA=""  # main.py's defaults: batch 128, bf16 + channels_last on CUDA
  SERVE_ARGS=(--models vgg16 --concurrency 1,8,32)
fi

steps() { "$PY" -m bench.gpu_steps "$@"; }
left() { echo $((BUDGET - SECONDS)); }
# run NAME CAP_S [run options] -- COMMAND...: logged to $LOGS/NAME.log and recorded,
# stopped after CAP_S or when the call's budget runs out, whichever comes first; not
# started (and recorded so) with less than 20 s left.
run() {
  local name=$1 cap=$2 remaining
  shift 2
  remaining=$(( $(left) - 10 ))
  if [ "$remaining" -lt 20 ]; then
    echo "{\"step\": \"$STEP\", \"name\": \"$name\", \"not_run\": \"the call's ${BUDGET} s budget is spent\"}" \
      | tee -a "$GPU_CHECK_JSONL"
    return
  fi
  steps run --name "$name" --log "$LOGS/$name.log" --timeout $(( cap < remaining ? cap : remaining )) "$@"
}
# A quick check (no command of its own to cap): only with a minute to spare.
check() { if [ "$(left)" -gt 60 ]; then steps "$@"; else echo "# not run (budget spent): $*"; fi; }
has_flag() { "$PY" "$1" --help 2>/dev/null | grep -q -- "$2"; }

install_wheels() {
  # The pure-Python packages the image lacks (tensorboardX: main.py's logs; the serving
  # stack: serve.py and its tests), from the carried folder only; pip takes from it
  # only what the image's own packages do not already satisfy.
  if [ ! -d "$WHEELS" ]; then
    echo "# $WHEELS not carried: nothing installed (run bench/gpu_prepare.sh here, carry $WHEELS)"
    return
  fi
  local pkg missing=()
  for pkg in tensorboardX fastapi uvicorn python-multipart prometheus-client fastapi-offline; do
    "$PY" -c "import importlib.metadata as m; m.version('$pkg')" 2>/dev/null && continue
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir --no-compile "$pkg" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "# pip could not install ${missing[*]} with its dependencies; tensorboardX alone into /tmp/nima_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/nima_site "$WHEELS"/tensorboard[xX]-*.whl \
      && export PYTHONPATH=/tmp/nima_site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

install_wheels
CARD=$(steps card 2>/dev/null || echo unknown)
DATE=$(date -u +%Y-%m-%d)
export GPU_CHECK_JSONL="$OUT/${DATE}_${CARD}.jsonl"
SIZE=$("$PY" -c "from model import default_model_args as d; print(d('$MODEL')['resize_size'])")
CACHE="$DATA/cache$SIZE"
echo "# gpu_check: steps $STEPS, card $CARD, device $DEVICE, model $MODEL, data $DATA, results $GPU_CHECK_JSONL"

make_data() {  # idempotent: files already there are kept
  run data 120 -- "$PY" -m bench.gpu_steps data "$DATA" --images "$IMAGES" --size "$SIZE" --workers "$WORKERS" \
    --train "$TRAIN" --val "$VAL" --test "$TEST"
  head -n "$PARITY" "$DATA/test.csv" > "$DATA/parity.csv"
}

# main.py's training flags on the generated data; the rest come from the caller. VGG16
# is the default backbone: it is left to the default, as users train it.
train_args() {  # CKPT_DIR
  local backbone=""
  [ "$MODEL" != vgg16 ] && backbone="--base_model $MODEL"
  echo --train --img_path "$CACHE" --train_csv_file "$DATA/train.csv" --val_csv_file "$DATA/val.csv" \
    --ckpt_path "$1" --snapshot_dir "$1/snapshots" $backbone --pretrained none \
    --num_workers "$WORKERS" --device "$DEVICE" --quiet $TRAIN_EXTRA
}

step_suite() {
  steps env
  local xdist=()
  # Files are independent: one file per worker process keeps each file's fixtures together.
  if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8 --dist loadfile); fi
  run suite_cpu 300 --parse pytest -- env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -rfEs "${xdist[@]}" "${SUITE_FILES[@]}"
  local failing
  failing=$(grep -oE '^(FAILED|ERROR) [^ ]+' "$LOGS/suite_cpu.log" | awk '{print $2}' | sort -u | head -40)
  if [ -n "$failing" ] && [ ${#xdist[@]} -gt 0 ]; then
    # Whether a failure belongs to the test or to running files side by side.
    # shellcheck disable=SC2086
    run suite_cpu_rerun_serial 90 --parse pytest -- env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -rfEs $failing
  fi
  run suite_cuda 140 --parse pytest -- "$PY" -m pytest -q -rfEs -s "${CUDA_FILES[@]}"
}

step_bench() {
  check peak
  run bench_b128 320 --parse bench -- "$PY" -m bench.bench --device "$DEVICE" --only train_synthetic,infer_synthetic \
    --batch_size "$BATCH" --infer_images "$INFER_IMAGES" "${BENCH_ARGS[@]}" --out "$LOGS/bench_b128.jsonl"
  run bench_b256 190 --parse bench -- "$PY" -m bench.bench --device "$DEVICE" --only train_synthetic,infer_synthetic \
    --batch_size $((BATCH * 2)) --infer_images "$INFER_IMAGES" --variants bf16+channels_last,bf16+channels_last+compile,channels_last \
    "${BENCH_ARGS[@]}" --out "$LOGS/bench_b256.jsonl"
}

step_e2e() {
  make_data
  run bench_jpeg 400 --parse bench -- "$PY" -m bench.bench --device "$DEVICE" --only decode_1core,loader,train_jpeg,infer_jpeg \
    --data_dir "$DATA" --num_images $((IMAGES < 2048 ? IMAGES : 2048)) --workers "$WORKERS" --batch_size "$BATCH" \
    --infer_images "$INFER_IMAGES" "${BENCH_ARGS[@]}" --out "$LOGS/bench_jpeg.jsonl"
}

step_infer() {
  make_data
  local ckpt="$DATA/random_$MODEL.pth" variants=("default:") v label flags
  [ -f "$ckpt" ] || steps ckpt "$ckpt" --base_model "$MODEL"
  # The loader paths test.py offers (the flags exist once wired into test.py).
  # auto is uint8 on CUDA: the float path is the one to measure beside it.
  if has_flag test.py --uint8_transfer; then variants+=("uint8_off:--uint8_transfer off"); fi
  if has_flag test.py --gpu_decode; then variants+=("gpu_decode:--gpu_decode"); fi
  for v in "${variants[@]}"; do
    label=${v%%:*} flags=${v#*:}
    for set in test all; do
      local n; n=$(wc -l < "$DATA/$set.csv")
      # shellcheck disable=SC2086
      run "testpy_cache_${label}_$n" 50 --images "$n" -- "$PY" test.py --model "$ckpt" --test_csv_file "$DATA/$set.csv" \
        --test_images "$CACHE" --predictions "$LOGS/pred_${label}_$n" --num_workers "$WORKERS" --batch_size 256 \
        --device "$DEVICE" --quiet $flags
    done
    check marginal --name "testpy_cache_${label}_marginal" --small "testpy_cache_${label}_$(wc -l < "$DATA/test.csv")" \
      --big "testpy_cache_${label}_$(wc -l < "$DATA/all.csv")"
  done
  # From the full-size originals: CPU decoding in the workers, or on the device.
  for v in "default:" "gpu_decode:--gpu_decode"; do
    label=${v%%:*} flags=${v#*:}
    [ "$label" = gpu_decode ] && ! has_flag test.py --gpu_decode && continue
    # shellcheck disable=SC2086
    run "testpy_original_${label}_$IMAGES" 60 --images "$IMAGES" -- "$PY" test.py --model "$ckpt" \
      --test_csv_file "$DATA/all.csv" --test_images "$DATA/original" --predictions "$LOGS/pred_orig_${label}" \
      --num_workers "$WORKERS" --batch_size 256 --device "$DEVICE" --quiet $flags
  done
}

step_train() {
  make_data
  local d="$DATA/ckpt_default" t="$DATA/ckpt_torchrun"
  rm -rf "$d" "$t"
  # shellcheck disable=SC2046
  run train_default 170 --merge "$LOGS/train_default.json" -- "$PY" -m bench.gpu_steps main --json "$LOGS/train_default.json" \
    -- $(train_args "$d") --epochs "$EPOCHS"
  check check_run --name train_default_outputs "$d" --epochs "$EPOCHS"
  # process_group_backends in its record says whether a process group (NCCL) was made.
  # shellcheck disable=SC2046
  run train_torchrun 170 --merge "$LOGS/train_torchrun.json" -- "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node=1 -m bench.gpu_steps main --json "$LOGS/train_torchrun.json" -- $(train_args "$t") --epochs "$EPOCHS"
  check check_run --name train_torchrun_outputs "$t" --epochs "$EPOCHS"
}

step_parity() {
  make_data
  local d="$DATA/ckpt_default" parity="$LOGS/parity"
  if [ ! -f "$d/best.pth" ]; then  # the train step ran on another machine: one epoch makes a checkpoint
    # shellcheck disable=SC2046
    run parity_checkpoint 150 -- "$PY" main.py $(train_args "$d") --epochs 1
  fi
  # CUDA against CPU on one checkpoint: bf16 (the CUDA default), then float32.
  local common=(--model "$d/best.pth" --test_csv_file "$DATA/parity.csv" --test_images "$CACHE" --num_workers "$WORKERS" --quiet)
  run parity_cpu 90 -- "$PY" test.py "${common[@]}" --device cpu --amp off --predictions "$parity/cpu"
  run parity_cuda_auto 45 -- "$PY" test.py "${common[@]}" --device "$DEVICE" --predictions "$parity/cuda_auto"
  run parity_cuda_amp_off 45 -- "$PY" test.py "${common[@]}" --device "$DEVICE" --amp off --predictions "$parity/cuda_off"
  # The same with cuBLAS/cuDNN told to keep TF32 off whatever torch asks: tells a TF32
  # convolution apart from any other cause if --amp off misses 1e-5.
  run parity_cuda_amp_off_tf32_override 45 -- env NVIDIA_TF32_OVERRIDE=0 "$PY" test.py "${common[@]}" --device "$DEVICE" \
    --amp off --predictions "$parity/cuda_off_notf32"
  check compare --name parity_testpy_bf16 "$parity/cpu" "$parity/cuda_auto"
  check compare --name parity_testpy_amp_off "$parity/cpu" "$parity/cuda_off"
  check compare --name parity_testpy_amp_off_tf32_override "$parity/cpu" "$parity/cuda_off_notf32"
  # main.py --test writes into <ckpt_path>/test: one copy per device.
  local dev
  for dev in cpu "$DEVICE"; do
    rm -rf "$d/test" "$parity/main_$dev"
    run "parity_mainpy_$dev" 90 -- "$PY" main.py --test --ckpt_path "$d" --img_path "$CACHE" \
      --test_csv_file "$DATA/parity.csv" --device "$dev" --amp off --num_workers "$WORKERS" --quiet
    mkdir -p "$parity" && [ -d "$d/test" ] && cp -r "$d/test" "$parity/main_$dev"
  done
  check compare --name parity_mainpy_amp_off "$parity/main_cpu" "$parity/main_$DEVICE"
}

step_compile() {
  make_data
  local c="$DATA/ckpt_compile"
  rm -rf "$c"
  # shellcheck disable=SC2046
  run train_compile 260 --merge "$LOGS/train_compile.json" -- env TORCH_LOGS=recompiles "$PY" -m bench.gpu_steps main \
    --json "$LOGS/train_compile.json" -- $(train_args "$c") --epochs "$EPOCHS" --compile
  check recompiles --name train_compile_recompiles "$LOGS/train_compile.log"
  # shellcheck disable=SC2046
  run train_compile_resume 150 --merge "$LOGS/train_compile_resume.json" -- env TORCH_LOGS=recompiles "$PY" \
    bench/gpu_steps.py main --json "$LOGS/train_compile_resume.json" -- $(train_args "$c") --epochs $((EPOCHS + 1)) \
    --compile --resume auto
  check recompiles --name train_compile_resume_recompiles "$LOGS/train_compile_resume.log"
  check check_run --name train_compile_outputs "$c" --epochs $((EPOCHS + 1))
  run testpy_compiled_result 50 --images "$TEST" -- "$PY" test.py --model "$c/best.pth" --test_csv_file "$DATA/test.csv" \
    --test_images "$CACHE" --predictions "$LOGS/pred_compiled" --num_workers "$WORKERS" --batch_size 256 --device "$DEVICE" --quiet
}

step_profile() {
  make_data
  run profile 240 -- "$PY" -m bench.gpu_steps profile "$DATA" --out "$OUT" --base_model "$MODEL" \
    --batch_size $((BATCH * 2)) --workers "$WORKERS"
}

step_serve() {
  # The target: the service at 32 clients at least 70 % of direct batched scoring (ratio_to_direct).
  run serve_load 300 --records "$LOGS/serve_load.jsonl" -- "$PY" -m bench.serve_load --device "$DEVICE" "${SERVE_ARGS[@]}" \
    --out "$LOGS/serve_load.jsonl"
}

for STEP in ${STEPS//,/ }; do
  if ! declare -F "step_$STEP" >/dev/null; then
    echo "unknown step '$STEP': suite, bench, e2e, infer, train, parity, compile, serve or profile"
    exit 2
  fi
done
for STEP in ${STEPS//,/ }; do
  export GPU_CHECK_STEP=$STEP
  LOGS="$DATA/logs/$STEP"
  mkdir -p "$LOGS"
  echo "# ---- step $STEP ($(date -u +%H:%M:%S))"
  start=$SECONDS
  "step_$STEP"
  steps_done=${steps_done:+$steps_done,}$STEP
  echo "# ---- step $STEP done in $((SECONDS - start)) s"
done

# Every command's full log, at most 15 MB (the device tool returns files of up to 16 MiB).
( cd "$DATA/logs" && tar czf "$OUT/${steps_done//,/_}_logs.tar.gz" --exclude="pred_*" ${steps_done//,/ } )
if [ "$(stat -c %s "$OUT/${steps_done//,/_}_logs.tar.gz")" -gt 15000000 ]; then
  ( cd "$DATA/logs" && find ${steps_done//,/ } -name '*.log' -size +1M -exec sh -c 'tail -c 1000000 "$1" > "$1.tail" && mv "$1.tail" "$1"' _ {} \; \
    && tar czf "$OUT/${steps_done//,/_}_logs.tar.gz" --exclude="pred_*" ${steps_done//,/ } )
fi
echo "# ---- summary ($GPU_CHECK_JSONL)"
steps summary "$GPU_CHECK_JSONL"
