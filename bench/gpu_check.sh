#!/usr/bin/env bash
# The first thing to run on a GPU: the CUDA test subset, then every GPU benchmark, then one table.
#
#     bash bench/gpu_check.sh                 # on an H100/H200: <= 8 minutes (each step has its own timeout)
#     bash bench/gpu_check.sh --cpu-smoke     # anywhere: GPU hidden, tiny sizes, ~30 s: proves the script works
#     bash bench/gpu_check.sh --out DIR       # keep the logs in DIR (default: $OUT if set, else a temp dir)
#
# Steps (each one's full output is in DIR/<step>.log; the table picks one headline per step):
#   tests        pytest -m gpu tests/test_gpu.py: bf16, fp16 + GradScaler, FlexAttention vs dense mask,
#                CUDA-graph decode vs eager, torch.compile, fused AdamW, Muon in bf16 (all skip without CUDA)
#   train 26M    bench/train_throughput.py: pretraining tokens/s, MFU, peak memory (compiled, bf16)
#   train 64M    the same at 64M (issue 3's target: >= 1.0M tokens/s, >= 52% MFU on an H100)
#   sft packing  bench/sft_packing.py: packed vs pad-to-max real tokens/s (64M, FlexAttention)
#   generate     bench/generate_throughput.py: new tokens/s at batch 1 and 16 (CUDA graphs; then + compile)
#   grpo memory  bench/grpo_memory.py: one GRPO step's peak memory and rollout tokens/s, packed vs padded
# Exit status: 0 when every step passed, 1 otherwise. Without a GPU (and without --cpu-smoke) it says so and runs
# the smoke sizes, so it never reports GPU figures it did not measure.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --out) DIR="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "error: $1: unknown option; use --cpu-smoke and/or --out DIR" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$DIR" ] || DIR="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$DIR"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible: running the CPU smoke sizes instead (no GPU figures)"
    SMOKE=1
fi
if [ "$SMOKE" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" MINIMIND_CACHE="$DIR/cache" OMP_NUM_THREADS=1
fi

# Data: the embedded default dataset (git-ignored, so a fresh checkout may lack it): built when missing.
DATA="$ROOT/dataset/default"
if [ "$SMOKE" = 1 ]; then
    DATA="$DIR/data"
    "$PY" dataset/build_default.py --out_dir "$DATA" --tiny > "$DIR/data.log" 2>&1 || { cat "$DIR/data.log"; exit 1; }
elif [ ! -f "$DATA/pretrain.jsonl" ] || [ ! -f "$DATA/sft.jsonl" ]; then
    DATA="$DIR/data"
    "$PY" dataset/build_default.py --out_dir "$DATA" > "$DIR/data.log" 2>&1 || { cat "$DIR/data.log"; exit 1; }
fi

if [ "$SMOKE" = 1 ]; then   # tiny shapes: minutes of GPU work become seconds of CPU work
    TRAIN_26="--device cpu --hidden_size 64 --num_hidden_layers 2 --batch_size 2 --max_seq_len 64 --warmup 1 --steps 1 --rounds 1 --num_threads 1"
    TRAIN_64="$TRAIN_26"
    SFT="--device cpu --n 100 --max_seq_len 128 --batch_size 4 --steps 1"
    GEN="--device cpu --hidden_size 64 --num_hidden_layers 2 --new_tokens 8 --batch_sizes 1 2 --repeats 1 --no_reference --threads 1"
    GEN2="$GEN --no_int8"
    GRPO=""
    T_TESTS=60; T_TRAIN=60; T_SFT=60; T_GEN=60; T_GRPO=60
else
    TRAIN_26="--device cuda --preset 26M --batch_size 64 --max_seq_len 340 --use_compile 1 --warmup 5 --steps 10 --rounds 3"
    TRAIN_64="--device cuda --preset 64M --batch_size 32 --max_seq_len 340 --use_compile 1 --warmup 5 --steps 10 --rounds 3"
    SFT="--device cuda --preset 64M --steps 10"
    GEN="--device cuda --hidden_size 768 --new_tokens 512 --batch_sizes 1 16"
    GEN2="$GEN --use_compile"
    GRPO="--device cuda --hidden_size 768 --num_hidden_layers 8 --max_gen_len 1024 --variants ours,padded"
    T_TESTS=150; T_TRAIN=70; T_SFT=60; T_GEN=40; T_GRPO=50   # worst case 480 s: the check stays within 8 minutes
fi

NAMES=(); STATUS=(); SECS=(); HEAD=()
step() {  # step NAME TIMEOUT HEADLINE_FN CMD...
    local name="$1" limit="$2" headline="$3"; shift 3
    local log="$DIR/${name// /_}.log" t0=$SECONDS rc
    echo "== $name: $*"
    timeout "$limit" "$@" > "$log" 2>&1
    rc=$?
    tail -n 4 "$log" | sed 's/^/   /'
    NAMES+=("$name"); SECS+=($((SECONDS - t0)))
    if [ $rc = 0 ]; then STATUS+=("ok"); elif [ $rc = 124 ]; then STATUS+=("TIMEOUT ${limit}s"); else STATUS+=("FAILED ($rc)"); fi
    HEAD+=("$($headline "$log")")
}
gpu_step() {  # a step that, at smoke sizes, would repeat the one before it or take minutes: skipped there
    if [ "$SMOKE" = 1 ]; then
        NAMES+=("$1"); STATUS+=("smoke: skip"); SECS+=(0); HEAD+=("GPU sizes only (at smoke sizes it repeats a step before, or takes minutes)")
    else
        step "$@"
    fi
}
# One headline per step, read off the script's own table.
h_tests() { grep -E "passed|failed|skipped|error" "$1" | tail -n 1; }
h_train() { awk '$1 == "base" { printf "%s tokens/s, MFU %s, peak %s %s", $2, $6, $7, $8 }' "$1"; }
h_sft() { awk '$1 == "packed" { printf "packed %s real tok/s = %s pad-to-max", $6, $7 }' "$1"; }
h_grpo() { awk '$1 == "ours" || $1 == "padded" { printf "%s%s peak %s MB, %s rollout tok/s", sep, $1, $6, $7; sep = "; " }' "$1"; }
h_gen() { awk '$1 == "cuda" || $1 == "cpu" { printf "%s%s bs%s %s tok/s", sep, $2, $3, $5; sep = "; " }' "$1"; }

step "tests"        "$T_TESTS" h_tests "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step "train 26M"    "$T_TRAIN" h_train "$PY" bench/train_throughput.py --data_path "$DATA/pretrain.jsonl" $TRAIN_26
gpu_step "train 64M" "$T_TRAIN" h_train "$PY" bench/train_throughput.py --data_path "$DATA/pretrain.jsonl" $TRAIN_64
step "sft packing"  "$T_SFT"   h_sft   "$PY" bench/sft_packing.py --data_path "$DATA/sft.jsonl" $SFT
step "generate"     "$T_GEN"   h_gen   "$PY" bench/generate_throughput.py $GEN
gpu_step "generate+compile" "$T_GEN" h_gen "$PY" bench/generate_throughput.py $GEN2
gpu_step "grpo memory"  "$T_GRPO"  h_grpo  "$PY" bench/grpo_memory.py $GRPO   # ~1 min on 2 CPU cores: GPU only

{
    echo
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') | $("$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU smoke)')") | logs $DIR"
    printf "| %-16s | %-12s | %5s | %s\n" "step" "status" "s" "headline"
    printf "|%s|%s|%s|%s\n" "------------------" "--------------" "-------" "----------"
    for i in "${!NAMES[@]}"; do
        printf "| %-16s | %-12s | %5s | %s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${HEAD[$i]}"
    done
    echo "total ${SECONDS}s"
} | tee "$DIR/summary.md"
for s in "${STATUS[@]}"; do [ "$s" = ok ] || [ "$s" = "smoke: skip" ] || exit 1; done
exit 0
