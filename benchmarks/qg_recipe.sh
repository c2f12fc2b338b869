#!/usr/bin/env bash
# The default fine-tuning recipe on sentence-level SQuAD question generation (issue 10), and the runs that
# chose its defaults. Every run logs its curve (greedy BLEU-4 / ROUGE-L and the clean dev loss on 300 dev
# pairs at each evaluation) to runs/NAME/log.jsonl; `score` decodes the full dev set (682) with the
# model's default decoding and scores it in the nqg convention into results/qg_recipe.jsonl.
#   bash benchmarks/qg_recipe.sh default            # `erniegen finetune` with no recipe flag: the done-when run
#   bash benchmarks/qg_recipe.sh probe NAME [FLAGS]  # same data and evaluations, recipe flags overridden
#   [TAG=T] bash benchmarks/qg_recipe.sh score NAME [FLAGS]  # decode + score runs/NAME/best (FLAGS: generate
#                                                    # options; TAG names the predictions file results/NAME-T.jsonl)
#   bash benchmarks/qg_recipe.sh plot OUT.png NAME...
# One training at a time, both threads: two side by side each crawl (OpenMP threads wait on each other).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/squad_qg_sent}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EG=".venv/bin/erniegen"
mkdir -p runs results

train() {  # name [flags...]
  local name=$1; shift
  /usr/bin/time -f "%e s wall" $EG finetune --model minilm --task squad_qg --train "$DATA/train.jsonl" \
    --dev "$DATA/dev.jsonl" --output "runs/$name" "$@" > "runs/$name.out" 2>&1
  tail -n 1 "runs/$name.out"
}

case "${1:-}" in
  default) train qg-default ;;
  probe) shift; train "$@" ;;
  score)
    name=$2; shift 2
    out="results/$name${TAG:+-$TAG}.jsonl"  # TAG=int8 score NAME --precision int8: one file per setting
    $EG generate --model "runs/$name/best" --input "$DATA/dev.jsonl" --output "$out" "$@"
    $EG evaluate --task squad_qg --predictions "$out" \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r['label']='$name ${*:-default decoding}'; print(json.dumps(r))" \
      | tee -a results/qg_recipe.jsonl ;;
  plot) out=$2; shift 2; $EG plot "${@/#/runs/}" --output "$out" ;;
  *) echo "usage: $0 default | probe NAME [FLAGS] | score NAME [FLAGS] | plot OUT.png NAME..." >&2; exit 2 ;;
esac
