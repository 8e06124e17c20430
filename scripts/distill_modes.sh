#!/usr/bin/env bash
# Three distillation algorithms, each with and without CLPD, at toy scale (+experiment=arith_methods:
# the 0.11M micro student, the arith_methods ladder, 600 steps): standard KD on the gold solutions,
# GKD with half of each step's prompts answered by the student (distill.on_policy=0.5), and
# sequence-level KD on the teachers' own solutions that reach the gold answer (distill.targets=teacher
# distill.keep=correct); method=standard_kd (strongest teacher, random order) against method=clpd
# (easy-first curriculum, progressive teachers), SEEDS paired seeds, then `clpd report`.
#
#   bash scripts/distill_modes.sh                      # SEEDS=0,1,2; JOBS=1; MODES=kd,seqkd,gkd
#   JOBS=2 bash scripts/distill_modes.sh               # two runs at once, each on cores / 2 threads
#   MODES=gkd SEEDS=3,4 bash scripts/distill_modes.sh  # one algorithm, more seeds, into the same OUT
#
# Needs the sweep extra (pip install -e '.[sweep]'). Stored teacher outputs where they apply (the
# gold and the teacher-written targets; GKD's samples are new at every step, so its teachers run
# live). The ladder, its solutions and its stores are built first, once, and shared by every run.
#
# Resumable: every run has trainer.resume=auto, so launching the script again with the same OUT
# skips the runs that finished and continues the others. Runs go to $OUT/runs/seed<S>/<mode>-<method>.
set -uo pipefail
SEEDS="${SEEDS:-0,1,2}"
OUT="${OUT:-multirun/distill_modes/arith}"
JOBS="${JOBS:-1}"
MODES="${MODES:-kd,seqkd,gkd}"
START=$SECONDS

run() { echo "+ $*"; "$@"; }
overrides() {  # what each algorithm adds to the preset
    case "$1" in
        kd) echo "distill.teacher_outputs=stored" ;;
        gkd) echo "distill.on_policy=0.5" ;;
        seqkd) echo "distill.targets=teacher distill.keep=correct distill.teacher_outputs=stored" ;;
        *) echo "MODES: unknown algorithm '$1'; allowed: kd, gkd, seqkd" >&2; return 1 ;;
    esac
}

for mode in ${MODES//,/ }; do overrides "$mode" > /dev/null || exit 2; done
# The ladder with its stores on the gold solutions, then the solutions every rung writes and the
# stores on those it got right.
run clpd train +experiment=arith_methods teachers.build_only=true distill.teacher_outputs=stored \
    "hydra.run.dir=$OUT/teachers/gold" trainer.resume=auto "$@" || exit 1
if [[ ",$MODES," == *,seqkd,* ]]; then
    # shellcheck disable=SC2046  # the mode's overrides are separate words
    run clpd train +experiment=arith_methods teachers.build_only=true $(overrides seqkd) \
        "hydra.run.dir=$OUT/teachers/written" trainer.resume=auto "$@" || exit 1
fi
for mode in ${MODES//,/ }; do
    # shellcheck disable=SC2046  # the mode's overrides are separate words
    run clpd train -m hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" +experiment=arith_methods "seed=$SEEDS" \
        method=standard_kd,clpd $(overrides "$mode") trainer.save_every=200 trainer.resume=auto \
        "hydra.sweep.dir=$OUT/runs" "hydra.sweep.subdir=seed\${seed}/$mode-\${hydra:runtime.choices.method}" "$@" \
        || echo "some $mode runs failed or were stopped: see the report"
done
run clpd report "$OUT/runs" --out "$OUT"
echo "distill modes: $((SECONDS - START)) s in all; report in $OUT"
