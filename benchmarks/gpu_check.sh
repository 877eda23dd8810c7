#!/usr/bin/env bash
# The project's GPU check: one call on a lent GPU machine, every figure into one summary.
#
# On the GPU machine (torch, no DALI, no network), after the parts of
# `DATA=../shared/datasets/imagenette-224 bash ../shared/tools/gpu-stage.sh` were sent:
#   command: . .gpu-stage/unpack.sh && bash benchmarks/gpu_check.sh      (timeout_s 560)
# Here, the same steps at toy sizes on the CPU (what tests/benchmarks/test_gpu_check.py runs,
# so the flags of every command below cannot rot unnoticed):
#   GPU_CHECK_DEVICE=cpu DATA=DIR OUT=/tmp/gc bash benchmarks/gpu_check.sh
#
# Correctness before speed: versions and decode parity, the CUDA tests, a short train + resume,
# eval, fp32 input, the smoke test, the step check (host syncs, memory over 3 epochs); then the
# throughput steps. The budget (GPU_CHECK_BUDGET s, default 480) is spent by measured time: a
# check step runs with its own limit or what is left of the budget, whichever is smaller (skipped
# under 30 s left); a throughput step runs only if its whole limit still fits, so those are the
# steps cut when a slow cold start eats the time. A failing step does not stop the rest.
# Throughput targets: train.py's step with real input at >= 90% (AlexNet 224) and >= 95%
# (ResNet-50 224) of its speed on the same batch replayed; each is printed with its figure.
# Outputs: $OUT/summary.txt (every step's rc and time, and the figure lines), $OUT/check.log
# (everything); the verdict line is printed too. Exit status, the first that applies:
#   1  a step ran and failed            3  a check step did not run (budget): not checked
#   4  a throughput target missed, or a throughput step did not run (not with --report-only)
#   2  bad input (no DATA/train, an unknown argument)      0  everything ran, passed, met
# On GPU_CHECK_DEVICE=cpu the CUDA-only steps are "not run (needs CUDA)": a CPU rehearsal of the
# commands, not a check of the GPU path.
#
# Usage: bash benchmarks/gpu_check.sh [--report-only]   (--report-only: targets printed, not enforced)
#
# Environment: GPU_CHECK_DEVICE cuda|cpu (default: cuda when torch sees one), DATA (ImageNet
# layout, train/ and val/; default $GPU_STAGE_DEST/data, where gpu-stage.sh unpacks its subset),
# OUT (default /tmp/gpu-check), GPU_CHECK_BUDGET, GPU_CHECK_WORK (scratch, default /tmp/gpu-check-work).
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT_ONLY=0
for arg in "$@"; do
  case $arg in
    --report-only) REPORT_ONLY=1 ;;
    *) echo "gpu_check: unknown argument $arg (usage: bash benchmarks/gpu_check.sh [--report-only])" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 ROTNET_PROGRESS=0
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
DATA=${DATA:-${GPU_STAGE_DEST:-/tmp/dali}/data}
OUT=${OUT:-/tmp/gpu-check}; W=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
BUDGET=${GPU_CHECK_BUDGET:-480}
mkdir -p "$OUT"; LOG=$OUT/check.log; SUM=$OUT/summary.txt; : > "$LOG"; : > "$SUM"
rm -rf "$W"; mkdir -p "$W"
T0=$SECONDS; FAILED=""; NOT_RUN=""; SPEED_NOT_RUN=""; MISSED=""

# ---------------------------------------------------------------------------- sizes
# GPU: the real protocol sizes. CPU: toy sizes, fp32 (bf16 is emulated on CPUs without
# AVX512-BF16/AMX and is ~30x slower there), a 1-process data loader.
if [ "$DEV" = cuda ]; then
  THREADS=$(nproc); BS=64; STEPS=40; WARM=5; SHORT=""
  TT_ARGS="--only alexnet224,resnet50_224 --steps 20 --warmup 5 --repeats 1"
  RUN_OVR="train.log_every=5"; TT_OVR=""
  SC_ARGS="--steps 20 --warmup 3 --epochs 3 --epoch-steps 50 train.precision=bf16"
  SC_ARGS="$SC_ARGS optim.batch_size_per_gpu=$BS"
else
  THREADS=2; BS=4; STEPS=2; WARM=1
  SHORT="model.width=0.25 data.crop_size=64 data.resize_size=72 train.precision=fp32"
  TT_ARGS="--case alexnet224=configs/imagenet_alexnet.yaml --case resnet50_224=configs/imagenet_resnet50.yaml"
  TT_ARGS="$TT_ARGS --only alexnet224,resnet50_224 --steps 2 --warmup 1 --repeats 1"
  RUN_OVR="train.log_every=1 optim.batch_size_per_gpu=4 loader.num_threads=1"
  TT_OVR="optim.global_batch_size=4 optim.batch_size_per_gpu=0 loader.num_threads=1 train.sync_bn=false"
  SC_ARGS="--steps 6 --warmup 1 --epochs 3 optim.batch_size_per_gpu=4 loader.num_threads=1"
fi

say() { echo "$*" | tee -a "$LOG" >> "$SUM"; }
run_step() {  # run_step NAME LIMIT_S CMD...: run under a time limit, log all, record rc
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, t=$((SECONDS - T0))s): $*" >> "$LOG"
  local t=$SECONDS; timeout -k 10 "$limit" "$@" > "$W/$name.out" 2>&1; local rc=$?
  cat "$W/$name.out" >> "$LOG"
  # the figure lines of each step go to the summary too
  grep -E "^(torch |DALI |decode |dali |reference |torch  |\| (alexnet|resnet|case)|images:|[0-9]+ passed|\
.*resumed from|.*top1|\| conv|sync check|  [0-9]+ x |memory )" "$W/$name.out" >> "$SUM" 2>/dev/null
  say "=== $name: rc=$rc in $((SECONDS - t)) s"
  [ $rc -eq 0 ] || FAILED="$FAILED $name"
}
left() { echo $((BUDGET - (SECONDS - T0))); }
skip() { say "=== $1: SKIPPED (budget: $((SECONDS - T0)) s used of $BUDGET)"; }
step() {  # step NAME LIMIT_S CMD...: a check; the limit shrinks to what is left of the budget
  local name=$1 limit=$2 rest; rest=$(left); shift 2
  if [ "$rest" -lt 30 ]; then skip "$name"; NOT_RUN="$NOT_RUN $name"; return; fi
  run_step "$name" $((limit < rest ? limit : rest)) "$@"
}
bench() {  # bench NAME LIMIT_S CMD...: a throughput step; runs only if its whole limit still fits
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt "$limit" ]; then skip "$name"; SPEED_NOT_RUN="$SPEED_NOT_RUN $name"; return 1; fi
  run_step "$name" "$limit" "$@"
}
target() {  # target CASE MIN: real input's steps/s over replayed, from train_throughput's table
  local case=$1 min=$2 ratio   # table columns: 2 case, 7 input, 8 steps/s
  ratio=$(awk -F'|' -v c=" $case " '$2 == c { sub(/^ +/, "", $7)
      if ($7 ~ /^real \(/) r = $8 + 0; else if ($7 ~ /^synthetic/) s = $8 + 0 }
    END { if (r > 0 && s > 0) printf "%.3f", r / s }' "$W/train_throughput.out")
  if [ -n "$ratio" ] && awk -v r="$ratio" -v m="$min" 'BEGIN { exit !(r >= m) }'; then
    say "target $case: real input at $ratio of replayed (target >= $min): met"
  else
    say "target $case: real input at ${ratio:-no figure} of replayed (target >= $min): MISSED"
    MISSED="$MISSED $case"
  fi
}
gpu_only() { if [ "$DEV" = cuda ]; then step "$@"; else say "=== $1: not run (needs CUDA; device $DEV)"; fi; }

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
say "gpu_check: device $DEV, data $DATA, budget $BUDGET s, commit $COMMIT"
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  >> "$SUM" 2>&1
if [ ! -d "$DATA/train" ]; then say "error: $DATA/train not found: set DATA (ImageNet layout)"; exit 2; fi

# ---------------------------------------------------------------------------- 1. DALI beside torch
# Versions, and DALI's decode against torchvision's on the same files (cuda: DALI mixed = nvJPEG;
# cpu: DALI's CPU decoder): within 3 grey levels on average per image.
step sanity 90 $PY - "$DATA/train" "$DEV" <<'EOF'
import sys, numpy as np, torch, torchvision
from torchvision.io import decode_jpeg, read_file
root, dev = sys.argv[1], sys.argv[2]
if dev == "cuda":
    torch.zeros(1, device="cuda")            # torch owns the context first, as in train.py
import nvidia.dali as dali, nvidia.dali.fn as fn, nvidia.dali.types as types
from nvidia.dali import backend as b, pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray
print("torch", torch.__version__, "cuda", torch.version.cuda, torchvision.__version__)
print("DALI", dali.__version__, "| its CUDA", b.GetCudaVersion() if dev == "cuda" else "-")
import glob, os
# the bytes as the loader's feed hands them to DALI: whole files read in Python, through external_source
files = sorted(f for f in glob.glob(os.path.join(root, "*", "*")) if os.path.isfile(f))[:16]
batch = [np.fromfile(f, dtype=np.uint8) for f in files]
@pipeline_def(batch_size=len(batch), num_threads=2, device_id=0 if dev == "cuda" else None, seed=1)
def dec():
    jpegs = fn.external_source(source=lambda: batch, batch=True, dtype=types.UINT8)
    return fn.decoders.image(jpegs, device="mixed" if dev == "cuda" else "cpu", output_type=types.RGB), jpegs
pipe = dec(); pipe.build()
images, raw = pipe.run()
diffs = []
for i in range(len(images)):
    if dev == "cuda":
        got = torch.empty(images[i].shape(), dtype=torch.uint8, device="cuda")
        feed_ndarray(images[i], got, cuda_stream=torch.cuda.current_stream())
        got = got.cpu()
    else:
        got = torch.from_numpy(np.asarray(images[i]))
    ref = decode_jpeg(torch.from_numpy(np.asarray(raw[i]).copy())).permute(1, 2, 0)
    if ref.shape[-1] == 1:
        ref = ref.expand(-1, -1, 3)
    diffs.append((got.float() - ref.float()).abs().mean().item())
print(f"decode DALI {'mixed' if dev == 'cuda' else 'cpu'} vs torchvision: mean |diff| {np.mean(diffs):.3f} "
      f"grey levels, worst image {max(diffs):.3f} ({len(diffs)} images)")
assert max(diffs) < 3.0, "DALI decode differs from torchvision's by 3+ grey levels"
EOF

# ---------------------------------------------------------------------------- 2. the CUDA tests
# A skipped test counts as a failure here: on this machine DALI and CUDA must both be there.
gpu_only cuda_tests 150 bash -c "$PY -m pytest -p no:cacheprovider -q -rs tests/pipelines/test_cuda.py \
  > $W/pytest.txt 2>&1; rc=\$?; cat $W/pytest.txt
  grep -q SKIPPED $W/pytest.txt && { echo 'tests skipped'; exit 1; }; exit \$rc"

# ---------------------------------------------------------------------------- 3. a short real run
# Stopped mid-epoch (train.max_steps), resumed from its checkpoint (the DALI reader state goes back
# into a new pipeline), then linear probes on two layers beside random init.
RUN="$PY train.py --config configs/imagenette_alexnet.yaml data.root=$DATA loader.backend=dali"
RUN="$RUN train.output_dir=$W/run $RUN_OVR $SHORT"
step train_resume 180 bash -c "set -eo pipefail; $RUN optim.epochs=1 train.max_steps=3
  $RUN optim.epochs=1 2>&1 | tee $W/resume.txt; grep 'resumed from' $W/resume.txt"
step eval 150 $PY eval.py --checkpoint "$W/run" --layer conv2,conv5 --epochs 1 --batch-size "$BS" \
  --with-random --output-dir "$W/eval" $([ "$DEV" = cpu ] && echo --precision fp32) \
  data.root="$DATA" loader.backend=dali

# ---------------------------------------------------------------------------- 4. review findings
# fp32 with the graph's own normalisation (the model must receive float32).
step fp32_graph_input 90 $PY train.py --config configs/imagenette_alexnet.yaml data.root="$DATA" \
  loader.backend=dali loader.normalize=graph train.output_dir="$W/fp32" train.precision=fp32 \
  train.max_steps=2 train.eval_rotation_every=0 $RUN_OVR $SHORT

# ---------------------------------------------------------------------------- 5. end-to-end smoke test
# (on CUDA its loss comparison has a stated tolerance: tests/test_train_smoke.py)
gpu_only smoke_test 150 $PY -m pytest -p no:cacheprovider -q -rs tests/test_train_smoke.py

# ---------------------------------------------------------------------------- 6. the step itself
# train.py's step with no host sync outside the logging window (20 steps, DALI input, AlexNet 224,
# bf16, under torch.cuda.set_sync_debug_mode), then GPU memory after each of 3 epochs, flat within 5%.
step step_check 150 $PY benchmarks/step_check.py --device $DEV --data "$DATA" \
  --config configs/imagenette_alexnet.yaml $SC_ARGS loader.backend=dali train.log_every=5 $SHORT

# Speed from here on: these steps are the ones the budget cuts.

# ---------------------------------------------------------------------------- 7. input pipeline
# Original images/s, every row ending at normalised float32 with the four rotations, DALI vs the
# torchvision reference; then the DALI graph with hw_decoder_load 0.9 instead of 0.65.
NTRAIN=$(find "$DATA/train" -type f | wc -l)
ST=$(( NTRAIN / BS - WARM - 1 )); [ $ST -gt $STEPS ] && ST=$STEPS
PIPE="$PY benchmarks/pipeline.py --device $DEV --batch-size $BS --warmup $WARM --steps $ST"
PIPE="$PIPE --threads $THREADS --no-write"
[ "$DEV" = cpu ] && PIPE="$PIPE --crop 32"
bench pipeline 150 bash -c "set -o pipefail;
  $PY benchmarks/image_set.py stats $DATA/train | sed 's/^/images: /' &&
  $PIPE --data $DATA/train --backends dali,reference &&
  $PIPE --data $DATA/train --backends dali loader.hw_decoder_load=0.9 | sed 's/^dali /dali hw0.9/'"

# ---------------------------------------------------------------------------- 8. ImageNet-sized photos
# The same images upscaled to 500x375 and re-encoded at quality 90: decode-bound like ImageNet.
BIG=$W/imagenet-sized
bench pipeline_imagenet_sized 150 bash -c "set -o pipefail; \
  $PY benchmarks/image_set.py upscale $DATA/train $BIG/train --workers $THREADS > /dev/null &&
  $PY benchmarks/image_set.py stats $BIG/train | sed 's/^/images: /' &&
  $PIPE --data $BIG/train --backends dali"

# ---------------------------------------------------------------------------- 9. training throughput
# train.py's own step with real DALI input vs the same batch replayed: AlexNet 224 (batch 192)
# and ResNet-50 224; targets >= 90% and >= 95% of synthetic.
if bench train_throughput 200 $PY benchmarks/train_throughput.py --device $DEV --imagenet-data "$DATA" \
  $TT_ARGS --out "" loader.backend=dali $TT_OVR $SHORT; then
  target alexnet224 0.90; target resnet50_224 0.95
fi

[ -f "$W/eval/eval.md" ] && cp "$W/eval/eval.md" "$OUT/"
say "=== done in $((SECONDS - T0)) s; failed:${FAILED:- none}; not run:${NOT_RUN:- none}; \
speed not run:${SPEED_NOT_RUN:- none}; targets missed:${MISSED:- none}$([ $REPORT_ONLY = 1 ] && echo ' (--report-only)')"
tail -n 1 "$SUM"
if [ -n "$FAILED" ]; then echo "gpu_check: failed:$FAILED" >&2; exit 1; fi
if [ -n "$NOT_RUN" ]; then echo "gpu_check: not run, so not checked:$NOT_RUN" >&2; exit 3; fi
if [ $REPORT_ONLY = 0 ] && [ -n "$MISSED$SPEED_NOT_RUN" ]; then
  echo "gpu_check: throughput targets missed:${MISSED:- none}; speed steps not run:${SPEED_NOT_RUN:- none}" >&2
  exit 4
fi
exit 0
