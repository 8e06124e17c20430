#!/usr/bin/env bash
# The three studies of the capacity-gap regime (+experiment=arith_gap: the nano student, the
# committed arith_gap ladder, equal token budgets, stored teacher outputs), one PART at a time:
#
#   PART=gap SEEDS=0,1,2 bash scripts/arith_gap.sh        # the student from each rung alone, and SFT
#   PART=arms SEEDS=0,1,2 bash scripts/arith_gap.sh       # sft, standard_kd, curriculum_only, teacher_schedule_only, clpd
#   PART=placement SEEDS=0,1,2 bash scripts/arith_gap.sh  # clpd with stages at equal steps, over all five rungs
#                                                         # and over s-xl (the pool-growth partner is the arms
#                                                         # part's clpd run of the seed)
#
# Every seed of a part runs all of the part's arms on the one committed ladder: a complete paired
# block. Runs go to $OUT/<part>/runs/seed<S>/<arm> on Hydra's joblib launcher (JOBS lanes of
# cores/JOBS threads each); trainer.resume=auto makes a relaunch skip the finished runs and continue
# the others. After the sweep the records (configs, status, summaries, metrics, eval metrics, the
# final checkpoint's manifest; no weights) are copied into $RECORDS/<part>/runs, and the part's
# report is rebuilt from the records alone (clpd report; scripts/gap_figure.py for PART=gap).
# Needs the sweep extra (pip install -e '.[sweep]').
set -uo pipefail
PART="${PART:?PART=gap, arms or placement}"
SEEDS="${SEEDS:-0,1,2}"
JOBS="${JOBS:-2}"
OUT="${OUT:-multirun/arith_gap}"
RECORDS="${RECORDS:-docs/results/arith-gap}"
START=$SECONDS

run() { echo "+ $*"; "$@"; }
sweep() {  # the part's arms for SEEDS: sweep SUBDIR OVERRIDES...
    local subdir="$1"; shift
    run clpd train -m hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" +experiment=arith_gap "seed=$SEEDS" \
        trainer.save_every=1000 trainer.resume=auto "hydra.sweep.dir=$OUT/$PART/runs" "hydra.sweep.subdir=seed\${seed}/$subdir" \
        "$@" "${EXTRA[@]}" || echo "some $PART runs failed or were stopped: see the report"
}
EXTRA=("$@")

case "$PART" in
    gap|arms|placement) ;;
    *) echo "PART=$PART: unknown part; allowed: gap, arms, placement" >&2; exit 2 ;;
esac
# Every rung's stored outputs first, once, so that parallel runs read them instead of racing to build them.
STORED=distill.teacher_outputs=stored
run clpd train +experiment=arith_gap teachers.build_only=true $STORED "hydra.run.dir=$OUT/teachers" trainer.resume=auto "$@" || exit 1
case "$PART" in
    gap)
        sweep sft method=sft
        sweep "\${teachers.fixed}" method=standard_kd teachers.schedule=fixed teachers.fixed=xs,s,m,l,xl $STORED ;;
    arms)
        sweep sft method=sft
        sweep "\${hydra:runtime.choices.method}" method=standard_kd,curriculum_only,teacher_schedule_only,clpd $STORED ;;
    placement)  # equal steps over the five rungs, and over s-xl (the rungs pool placement uses here: xs's stage is empty)
        sweep clpd-steps method=clpd curriculum.stage_placement=steps $STORED
        sweep clpd-steps-s-xl method=clpd curriculum.stage_placement=steps $STORED "teachers.ladder=[$(
            for r in s m l xl; do printf '{name: %s, path: docs/results/arith-gap/ladder/%s},' $r $r; done | sed 's/,$//')]" ;;
esac
bash scripts/archive_runs.sh "$OUT/$PART/runs" "$RECORDS/$PART/runs"
if [[ "$PART" == placement ]]; then  # with the arms part's clpd runs (stages by pool growth)
    run clpd report "$RECORDS/placement/runs" "$RECORDS"/arms/runs/seed*/clpd --out "$RECORDS/placement" \
        --baseline curriculum.stage_placement=pool
else
    # The arms against standard KD, then against SFT, then against the curriculum alone (what the teachers' schedule adds to it).
    baselines=(--baseline method=standard_kd --baseline method=sft --baseline method=curriculum_only)
    [[ "$PART" == gap ]] && baselines=(--baseline method=sft)  # the rungs against SFT (gap.md: against the best rung)
    run clpd report "$RECORDS/$PART/runs" --out "$RECORDS/$PART" "${baselines[@]}"
fi
[[ "$PART" == gap ]] && run python scripts/gap_figure.py "$RECORDS/gap/runs" --out "$RECORDS/gap"
echo "arith_gap $PART: $((SECONDS - START)) s in all; records and report in $RECORDS/$PART"
