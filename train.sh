#!/usr/bin/env bash
# The whole pipeline, one stage after another; each stage's output directory is the next stage's input:
#   build data -> train tokenizer -> pretrain -> SFT -> DPO -> chat with the result.
#
#   bash train.sh                       # embedded offline demo: tiny model, ~10 minutes on a 2-core CPU
#   bash train.sh --quick               # the same pipeline in about a minute (what the tests run)
#   bash train.sh --with lora,distill   # also LoRA (adapter + merge) and distillation into a smaller student
#   bash train.sh --preset 64M --pretrain_data dataset/minimind/pretrain_t2t_mini.jsonl \
#        --sft_data dataset/minimind/sft_t2t_mini.jsonl --dpo_data dataset/minimind/dpo.jsonl \
#        -- --max_seq_len 768                                     # a real run on MiniMind-3's files
#
# Every flag after `--` goes to every train_*.py (e.g. `-- --device cuda --use_compile 1`).
set -euo pipefail
cd "$(dirname "$0")"

PRESET=tiny
OUT=out
PRETRAIN_DATA=""; SFT_DATA=""; DPO_DATA=""
QUICK=0
WITH=""
EXTRA=()
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; cat <<'EOF'
flags:
  --preset NAME          model size: tiny (default), 26M, 64M, 104M, moe   (see minimind/config.py)
  --pretrain_data FILE   pretraining JSONL ({"text": ...});       default: the embedded demo data
  --sft_data FILE        SFT JSONL ({"conversations": [...]});   default: the embedded demo data
  --dpo_data FILE        DPO JSONL ({"chosen": [...], "rejected": [...]}); default: the embedded demo data
  --out DIR              where the stage directories go (default: out)
  --quick                tiny data and a few steps: checks the whole pipeline in about a minute
  --with STAGES          extra stages, comma-separated: lora (adapter on the SFT model, then merged), distill
                         (a half-width student learns from the SFT model's logits), grpo (RL on the SFT model:
                         arithmetic prompts with verifiable answers, built offline by dataset/build_rl.py)
EOF
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --pretrain_data) PRETRAIN_DATA="$2"; shift 2 ;;
    --sft_data) SFT_DATA="$2"; shift 2 ;;
    --dpo_data) DPO_DATA="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --with) WITH=",$2,"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown flag $1 (see bash train.sh --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# On a CPU shared with other jobs, OpenMP threads that spin while waiting slow training 3x (dev/LOG.md);
# passive waiting costs nothing on an idle machine. Must be set before torch is imported.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }
t_start=$(date +%s)

# --- 1. data ----------------------------------------------------------------------------------------------------
DEMO=0
if [[ -z "$PRETRAIN_DATA$SFT_DATA$DPO_DATA" ]]; then
  DEMO=1
  DATA_DIR=dataset/default; [[ $QUICK == 1 ]] && DATA_DIR="$OUT/data-quick"
  stage "1/6 build the embedded default dataset from CPython's documentation -> $DATA_DIR"
  $PY dataset/build_default.py --out_dir "$DATA_DIR" $([[ $QUICK == 1 ]] && echo --tiny)
  PRETRAIN_DATA=$DATA_DIR/pretrain.jsonl; SFT_DATA=$DATA_DIR/sft.jsonl; DPO_DATA=$DATA_DIR/dpo.jsonl
else
  for f in "$PRETRAIN_DATA" "$SFT_DATA" "$DPO_DATA"; do
    [[ -f "$f" ]] || { echo "error: --pretrain_data, --sft_data and --dpo_data must all be given as existing files (missing: '${f}')" >&2; exit 2; }
  done
fi

# Step budgets. The demo is sized for ~10 minutes on a 2-core CPU (a GPU finishes it in seconds);
# a real run (your own data) goes by epochs instead, with MiniMind's usual batch sizes.
if [[ $QUICK == 1 ]]; then
  PRE=(--max_steps 30 --batch_size 8 --max_seq_len 128 --learning_rate 2e-3)
  SFT=(--max_steps 20 --batch_size 8 --max_seq_len 256 --learning_rate 1e-3)
  DPO=(--max_steps 5 --batch_size 4 --max_seq_len 256 --learning_rate 1e-5)
elif [[ $DEMO == 1 ]]; then
  PRE=(--epochs 3 --max_steps 1000 --batch_size 16 --max_seq_len 256 --learning_rate 1.5e-3 --warmup_iters 50)
  SFT=(--epochs 3 --max_steps 300 --batch_size 16 --max_seq_len 256 --learning_rate 1e-3 --warmup_iters 10)
  DPO=(--epochs 1 --max_steps 60 --batch_size 8 --max_seq_len 256 --learning_rate 1e-5)
else
  PRE=(--epochs 1 --batch_size 32 --max_seq_len 340 --warmup_iters 1000 --save_interval 1000)   # LR: the preset's
  SFT=(--epochs 2 --batch_size 16 --max_seq_len 512 --learning_rate 5e-5 --warmup_iters 100 --save_interval 1000)
  DPO=(--epochs 1 --batch_size 4 --max_seq_len 1024 --learning_rate 1e-6 --save_interval 1000)
fi

# --- 2. tokenizer -----------------------------------------------------------------------------------------------
stage "2/6 train the BPE tokenizer -> $OUT/tokenizer"
$PY train_tokenizer.py --data_path "$PRETRAIN_DATA" --out_dir "$OUT/tokenizer" --vocab_size 6400 \
    $([[ $DEMO == 0 ]] && echo --max_chars 200000000)

# --- 3-5. training stages -----------------------------------------------------------------------------------------
stage "3/6 pretrain ($PRESET) -> $OUT/pretrain"
$PY train_pretrain.py --preset "$PRESET" --tokenizer "$OUT/tokenizer" --data_path "$PRETRAIN_DATA" \
    --out_dir "$OUT/pretrain" "${PRE[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
stage "4/6 supervised fine-tuning -> $OUT/sft"
$PY train_full_sft.py --from_weight "$OUT/pretrain" --data_path "$SFT_DATA" --out_dir "$OUT/sft" \
    "${SFT[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
stage "5/6 DPO -> $OUT/dpo"
$PY train_dpo.py --from_weight "$OUT/sft" --data_path "$DPO_DATA" --out_dir "$OUT/dpo" \
    "${DPO[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

# --- optional stages ---------------------------------------------------------------------------------------------
if [[ $WITH == *,lora,* ]]; then
  stage "extra: LoRA on the SFT model -> $OUT/lora (adapter), $OUT/lora_merged (full model)"
  $PY train_lora.py --from_weight "$OUT/sft" --data_path "$SFT_DATA" --out_dir "$OUT/lora" \
      "${SFT[@]}" --learning_rate 2e-3 ${EXTRA[@]+"${EXTRA[@]}"}
  $PY train_lora.py --merge 1 --from_weight "$OUT/sft" --lora_path "$OUT/lora" --out_dir "$OUT/lora_merged"
fi
if [[ $WITH == *,distill,* ]]; then
  stage "extra: distill the SFT model into a half-width student -> $OUT/distill"
  $PY train_distill.py --teacher "$OUT/sft" --preset "$PRESET" --hidden_size 128 --tokenizer "$OUT/tokenizer" \
      --data_path "$SFT_DATA" --out_dir "$OUT/distill" "${SFT[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
fi

if [[ $WITH == *,grpo,* ]]; then
  stage "extra: GRPO on the SFT model, arithmetic with verifiable answers -> $OUT/grpo"
  $PY dataset/build_rl.py --out "$OUT/rl.jsonl" $([[ $QUICK == 1 ]] && echo "--n 64")
  $PY train_grpo.py --from_weight "$OUT/sft" --data_path "$OUT/rl.jsonl" --out_dir "$OUT/grpo" --batch_size 4 \
      --num_generations 4 --learning_rate 1e-5 --max_gen_len $([[ $QUICK == 1 ]] && echo "16 --max_steps 3" || echo "48 --max_steps 60") \
      ${EXTRA[@]+"${EXTRA[@]}"}
fi

# --- 6. talk to it ----------------------------------------------------------------------------------------------
if [[ $DEMO == 1 ]]; then  # what each stage learned: the three models side by side, hit rate, held-out perplexity
  stage "6/6 demo report: pretrain vs SFT vs DPO on fixed and held-out questions"
  $PY demo_report.py "$OUT" $([[ $QUICK == 1 ]] && echo "--tiny --max_new_tokens 24")
else
  stage "6/6 chat: fixed demo prompts, greedy decoding"
  $PY eval_model.py --load_from "$OUT/dpo" --prompts --max_new_tokens $([[ $QUICK == 1 ]] && echo 24 || echo 96)
fi
echo
echo "done in $(( $(date +%s) - t_start )) s. Chat yourself: python eval_model.py --load_from $OUT/dpo"
