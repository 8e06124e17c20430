#!/usr/bin/env bash
# The teacher ladder of +experiment=arith_gap, trained as ordinary supervised runs with a learning
# curve on the validation split, then copied (weights, config, tokenizer; no optimizer state) to
# the folder the preset's teachers point at, with a manifest of their sha256.
#
#   bash scripts/gap_ladder.sh                 # all five rungs, one after the other, into $OUT
#   RUNGS=xs,s bash scripts/gap_ladder.sh      # some of them
#
# The rungs (conf/teachers/arith_gap.yaml) learn from benchmark.seed=4242, problems other than the
# student's pool (seed 1234), and are scored during training on the validation split, never on
# the test split. Build lengths: STEPS_<rung> (defaults below, chosen on the validation curves).
# Resumable: trainer.resume=auto continues an interrupted rung; a finished rung is skipped.
set -euo pipefail
OUT="${OUT:-multirun/arith_gap/ladder}"
DEST="${DEST:-docs/results/arith-gap/ladder}"
RUNGS="${RUNGS:-xs,s,m,l,xl}"
declare -A ARCH=(
    [xs]="student.hidden_size=24 student.num_layers=2 student.num_heads=2 student.intermediate_size=72"
    [s]="student.hidden_size=48 student.num_layers=2 student.num_heads=4 student.intermediate_size=144"
    [m]="student.hidden_size=80 student.num_layers=3 student.num_heads=4 student.intermediate_size=240"
    [l]="student.hidden_size=128 student.num_layers=4 student.num_heads=4 student.intermediate_size=384"
    [xl]="student.hidden_size=160 student.num_layers=4 student.num_heads=4 student.intermediate_size=480"
)
declare -A STEPS=([xs]="${STEPS_xs:-3000}" [s]="${STEPS_s:-3000}" [m]="${STEPS_m:-3000}" [l]="${STEPS_l:-2000}"
                  [xl]="${STEPS_xl:-2000}")

EVAL=()  # clpd eval takes none of the training overrides ("$@"), only its own thread setting
[[ -n "${OMP_NUM_THREADS:-}" ]] && EVAL=("num_threads=$OMP_NUM_THREADS")
for rung in ${RUNGS//,/ }; do
    [[ -n "${ARCH[$rung]:-}" ]] || { echo "RUNGS: unknown rung '$rung'; allowed: xs, s, m, l, xl" >&2; exit 2; }
done
for rung in ${RUNGS//,/ }; do
    run="$OUT/$rung"
    if [[ ! -f "$run/checkpoints/final/COMPLETE" ]]; then
        # shellcheck disable=SC2086  # the architecture is separate words
        clpd train +experiment=arith_sft student.name="$rung" ${ARCH[$rung]} student.max_position_embeddings=512 \
            benchmark.max_steps=5 benchmark.seed=4242 benchmark.eval_split=validation \
            trainer.max_steps="${STEPS[$rung]}" trainer.eval_every=250 trainer.eval_at_end=true \
            trainer.save_every=250 trainer.resume=auto "hydra.run.dir=$run" "$@"
    fi
    mkdir -p "$DEST/$rung"
    for f in model.safetensors config.json generation_config.json tokenizer.json tokenizer_config.json; do
        cp "$run/checkpoints/final/$f" "$DEST/$rung/$f"
    done
    # Its test accuracy, once the build is chosen: what the tables report, never what chose it.
    [[ -f "$OUT/test-$rung/metrics.json" ]] || clpd eval checkpoint="$DEST/$rung" benchmark.max_steps=5 \
        "hydra.run.dir=$OUT/test-$rung" "${EVAL[@]}"
done
(cd "$DEST" && sha256sum ./*/model.safetensors > SHA256SUMS)
echo "ladder in $DEST:"; cat "$DEST/SHA256SUMS"
