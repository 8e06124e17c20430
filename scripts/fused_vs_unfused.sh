#!/usr/bin/env bash
# The output layer fused with the loss (trainer.fused_loss=true) against the same run unfused, step
# for step: +experiment=arith_methods (the micro student, forward KL, progressive teachers, the
# curriculum), STEPS optimizer steps, with a live teacher and with stored teacher outputs. Prints,
# for each, the largest relative difference of the per-step losses and of the final weights, next to
# float noise: the unfused run with 2 micro-batches of 16 instead of 4 of 8 (trainer.grad_accum=2:
# the same update in exact arithmetic, its sums in another order).
#
#   bash scripts/fused_vs_unfused.sh                    # STEPS=100; ~3 min on 2 idle cores, ladder built
#   bash scripts/fused_vs_unfused.sh teachers.cache_dir=/path/to/cached/ladder
#
# The arith_methods ladder is built on first use (~15 minutes) and shared by the six runs.
set -euo pipefail
STEPS="${STEPS:-100}"
OUT="${OUT:-multirun/fused_vs_unfused}"

for outputs in live stored; do
    for run in true:4 false:4 false:2; do  # fused_loss:grad_accum
        fused="${run%:*}" accum="${run#*:}"
        clpd train +experiment=arith_methods "trainer.max_steps=$STEPS" trainer.eval_every=null \
            trainer.eval_at_end=false trainer.log_every=1 "trainer.fused_loss=$fused" "trainer.grad_accum=$accum" \
            "distill.teacher_outputs=$outputs" "hydra.run.dir=$OUT/$outputs-fused-$fused-accum$accum" "$@"
    done
done

python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

out = Path(sys.argv[1])


def losses(run: Path) -> dict:
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def differences(one: Path, other: Path) -> str:
    a, b = losses(one), losses(other)
    assert a.keys() == b.keys() and a, f"{one.name}, {other.name}: the runs logged different steps"
    loss_rel = max(abs(a[s] - b[s]) / abs(b[s]) for s in b)
    wa = load_file(one / "checkpoints" / "final" / "model.safetensors")
    wb = load_file(other / "checkpoints" / "final" / "model.safetensors")
    weight_rel = max(float((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-30)) for k in wb)
    return (f"{len(b)} steps, per-step loss max rel diff {loss_rel:.2e} (last step {abs(a[max(b)] - b[max(b)]) / abs(b[max(b)]):.2e}), "
            f"final weights max |diff| / max |w| of a tensor {weight_rel:.2e}")


for outputs in ("live", "stored"):
    plain = out / f"{outputs}-fused-false-accum4"
    print(f"{outputs} teacher outputs")
    print(f"  fused vs unfused:                        {differences(out / f'{outputs}-fused-true-accum4', plain)}")
    print(f"  unfused, 2 vs 4 micro-batches (noise):   {differences(out / f'{outputs}-fused-false-accum2', plain)}")
EOF
