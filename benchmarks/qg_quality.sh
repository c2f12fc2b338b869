#!/usr/bin/env bash
# squad_qg quality benchmark: every method fine-tuned from all-MiniLM-L6-v2 on the same data and budget
# (136 steps of batch 32 = half an epoch of the 8,699 shared training pairs, lr 1e-4, sources cut to
# 256 tokens; STEPS=272 for a full epoch), then the full dev set (682) decoded and scored with nqg
# BLEU-4 / METEOR / ROUGE-L.
#   bash benchmarks/qg_quality.sh train        # the four trainings (each process single-threaded)
#   bash benchmarks/qg_quality.sh static       # MIST with static mixing (needs runs/qg-nat/best)
#   bash benchmarks/qg_quality.sh pretrain     # issue 3: continued pre-training on the shared corpus
#                                              # (PT_STEPS steps, default 600, with and without the span flow), then
#                                              # the same ernie-gen fine-tuning from each (and the
#                                              # baseline without pre-training, unless already trained)
#   bash benchmarks/qg_quality.sh evaluate [ar|nar [RUN]|pt [LABEL:RUN]]  # decode + score into results/
#                                              # (default: ar and nar; pt = the pre-training experiment's runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/squad_qg}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EG=".venv/bin/erniegen"
COMMON=(--train "$DATA/train.jsonl" --dev "$DATA/dev.jsonl" --task squad_qg --max-steps "${STEPS:-136}"
        --batch-size 32 --lr 1e-4 --max-source-len 256 --max-target-len 40 --eval-every "${EVAL_EVERY:-68}"
        --eval-samples 300)
mkdir -p runs results

finetune() {  # method: fine-tune all-MiniLM-L6-v2 into runs/qg-METHOD
  $EG finetune --model minilm "${COMMON[@]}" --method "$1" --output "runs/qg-$1" > "runs/qg-$1.out" 2>&1
}

score() {  # label model decoder [extra generate flags...]
  local label=$1 model=$2 decoder=$3; shift 3
  $EG generate --model "$model" --input "$DATA/dev.jsonl" --output "results/$label.jsonl" --decoder "$decoder" "$@"
  $EG evaluate --task squad_qg --predictions "results/$label.jsonl" \
    | python3 -c "import json,sys; r=json.load(sys.stdin); r['label']='$label'; print(json.dumps(r))" \
    | tee -a results/qg_quality.jsonl
}

case "${1:-}" in
  train)
    for m in ernie-gen typical nat mist; do finetune "$m" & done
    wait ;;
  static)
    printf 'method_options:\n  mixing: static\n  pseudo_from: runs/qg-nat/best\n' > runs/static.yaml
    $EG finetune --model minilm "${COMMON[@]}" --method mist --config runs/static.yaml \
      --output runs/qg-mist-static > runs/qg-mist-static.out 2>&1 ;;
  pretrain)   # one span vocabulary, then λ = 0.5 (the paper's) and λ = 1 (no span flow) side by side,
              # one single-threaded process each (torchrun is slower than one process on 2 cores: section 2);
              # corpus order (--shuffle-window 1), as in the run BENCHMARKS.md section 4 records
    CORPUS=${CORPUS:-../shared/data/corpus/train.jsonl}
    $EG span-vocab --corpus "$CORPUS" --output runs/span_vocab.tsv
    for variant in span:0.5 nospan:1; do
      name=${variant%%:*}
      ( $EG pretrain --model minilm --corpus "$CORPUS" --span-vocab runs/span_vocab.tsv --output "runs/pt-$name" \
          --max-steps "${PT_STEPS:-600}" --word-weight "${variant##*:}" --max-len 256 --batch-size 8 \
          --grad-accum 1 --warmup-steps 60 --shuffle-window 1 > "runs/pt-$name.out" 2>&1
        $EG finetune --model "runs/pt-$name/best" "${COMMON[@]}" --method ernie-gen --output "runs/qg-pt-$name" \
          > "runs/qg-pt-$name.out" 2>&1 ) &
    done
    [ -d runs/qg-ernie-gen/best ] || finetune ernie-gen &     # the no-pre-training baseline, alongside
    wait ;;
  evaluate)   # evaluate [ar|nar [RUN]]: both halves by default; halves and NAR runs can go side by side
    if [ "${2:-ar}" = ar ]; then
      score ernie-gen-beam5 runs/qg-ernie-gen/best infilling --num-beams 5
      score typical-beam5 runs/qg-typical/best typical --num-beams 5
      score ernie-gen-greedy runs/qg-ernie-gen/best infilling --num-beams 1
      score typical-greedy runs/qg-typical/best typical --num-beams 1
    fi
    if [ "${2:-}" = pt ]; then   # the pre-training experiment: ernie-gen with and without pre-training
      for run in ${3:-no-pt:ernie-gen pt-span:pt-span pt-nospan:pt-nospan}; do   # label:run folder
        for beams in 5 1; do
          score "ernie-gen-${run%%:*}-$([ $beams = 5 ] && echo beam5 || echo greedy)" "runs/qg-${run##*:}/best" \
            infilling --num-beams $beams
        done
      done
    fi
    if [ "${2:-nar}" = nar ]; then
      for run in ${3:-nat mist mist-static}; do
        [ -d "runs/qg-$run/best" ] || continue
        score "$run-nar" "runs/qg-$run/best" nar
        for k in 3 6; do
          score "$run-mist-iter-$k" "runs/qg-$run/best" mist-iter --iterations $k
          score "$run-mask-predict-$k" "runs/qg-$run/best" mask-predict --iterations $k
        done
        score "$run-nar-dedup" "runs/qg-$run/best" nar --dedup
      done
    fi ;;
  *) echo "usage: $0 train|static|pretrain|evaluate" >&2; exit 2 ;;
esac
