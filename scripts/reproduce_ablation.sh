#!/usr/bin/env bash
# The paper's comparison at embedded scale: sft, standard_kd, curriculum_only, teacher_schedule_only
# and clpd on arith (+experiment=arith: the 0.11M micro student, the arith_plateau ladder), 5 paired
# seeds each, then `clpd report` (per-arm mean +- std, tokens seen, paired difference to standard_kd
# with a 95% CI, learning curves). Cost on 2 CPU cores with JOBS=2 (measured 2026-12-01/02): about
# 4 to 4.5 hours, the ladder's build (30-60 min) and 25 runs of 10-23 min each on one thread.
#
#   bash scripts/reproduce_ablation.sh                 # SEEDS=0,1,2,3,4; OUT=multirun/ablation/arith
#   JOBS=2 bash scripts/reproduce_ablation.sh          # two seeds at a time, one thread each
#   ARMS=standard_kd,clpd bash scripts/reproduce_ablation.sh   # some of the arms
#   OUT=multirun/ablation/arith-tokens bash scripts/reproduce_ablation.sh trainer.max_tokens=9000000
#                                      # extra overrides go to every run: here, equal tokens, not steps
#
# Resumable: every job runs with trainer.resume=auto, so launching the script again with the same
# OUT skips the jobs that finished, continues a stopped one from its checkpoint (Ctrl-C or SIGTERM
# saves one) and runs the rest. Each run goes to $OUT/runs/seed<S>/<method>, seeds outer and arms
# inner, so a partial launch holds complete pairs, and a later launch with more ARMS or SEEDS adds to
# the same OUT.
#
# JOBS=N runs N runs at once, each with OMP_NUM_THREADS=(cores / N); their output is appended to
# $OUT/lane-<i>.log. The runs (seeds outer, arms inner) are dealt to the lanes in turn, so the lanes
# stay within one run of each other whatever the number of seeds (dealing whole seeds left one lane
# idle for a seed's five runs when there were three seeds on two lanes). On 2 CPU cores, two
# one-thread lanes finish about 1.3 times as many runs per hour as one two-thread job (the micro
# models are too small to keep two threads busy), but each run's train time is then longer: compare
# train times within one setting only. The thread count is part of the result: the same run on 1 and
# on 2 threads reaches different weights (different summation orders), so rerun a table's runs with
# its JOBS to reproduce it bit for bit.
#
# Seeds are paired: seed s gives every arm the same initial student weights and, in the random-order
# arms, the same batches. The teachers are trained once (first) and shared by all runs.
set -uo pipefail
SEEDS="${SEEDS:-0,1,2,3,4}"
OUT="${OUT:-multirun/ablation/arith}"
JOBS="${JOBS:-1}"
ARMS="${ARMS:-sft,standard_kd,curriculum_only,teacher_schedule_only,clpd}"
START=$SECONDS

clpd train +experiment=arith_teachers "hydra.run.dir=$OUT/teachers" trainer.resume=auto "$@" || exit 1

# trainer.eval_every=150: a learning curve (200 test problems every 150 steps) in each run's
# metrics.jsonl, to see whether the students end on a plateau or in the middle of a jump.
run_one() {  # one arm of one seed; a failed run does not stop the others (the report lists it)
    local seed=$1 arm=$2; shift 2
    clpd train +experiment=arith "seed=$seed" "method=$arm" trainer.eval_every=150 trainer.save_every=500 \
        trainer.resume=auto "hydra.run.dir=$OUT/runs/seed$seed/$arm" "$@" \
        || echo "seed $seed, $arm: failed or stopped: see the report"
}

IFS=, read -r -a seeds <<< "$SEEDS"
IFS=, read -r -a arms <<< "$ARMS"
todo=()  # "seed arm", seeds outer: a partial launch holds complete pairs
for seed in "${seeds[@]}"; do for arm in "${arms[@]}"; do todo+=("$seed $arm"); done; done
mkdir -p "$OUT"
if [ "$JOBS" -le 1 ]; then
    for job in "${todo[@]}"; do run_one $job "$@"; done
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}"
    # Stopping: the lanes are ended first, so that none starts its next run; then the running
    # runs get SIGTERM (Ctrl-C in the terminal has reached them already: a second signal would stop
    # them before they save). Each run saves a checkpoint and ends; the same command resumes them.
    stop() {
        local lanes runs pid
        lanes=$(jobs -p)
        runs=$(for pid in $lanes; do pgrep -P "$pid"; done)
        kill -TERM $lanes 2>/dev/null
        [ "$1" = TERM ] && kill -TERM $runs 2>/dev/null
        for pid in $runs; do while kill -0 "$pid" 2>/dev/null; do sleep 1; done; done
    }
    trap 'trap "" INT TERM; stop TERM; exit 143' TERM
    trap 'trap "" INT TERM; stop INT; exit 130' INT
    for ((lane = 0; lane < JOBS; lane++)); do
        (for ((i = lane; i < ${#todo[@]}; i += JOBS)); do run_one ${todo[i]} "$@"; done) >> "$OUT/lane-$lane.log" 2>&1 &
    done
    echo "$JOBS lanes of OMP_NUM_THREADS=$OMP_NUM_THREADS; their output: $OUT/lane-*.log"
    wait
fi
clpd report "$OUT/runs" --out "$OUT"
echo "ablation: $((SECONDS - START)) s in all; report in $OUT"
