#!/usr/bin/env bash
# Copy the records of the runs under SRC -- resolved configs and overrides (.hydra/), status,
# summary, metrics.jsonl (the loss and learning curves), eval metrics, the final checkpoint's
# manifest.json (sha256 of the teachers' weights and of the training data), and SRC's report --
# without weights, predictions or logs, a few hundred kB a run, to keep or share a measured sweep
# outside the machine that ran it (not in the repository):
#
#   bash scripts/archive_runs.sh multirun/ablation/arith /data/kept/ablation-arith
#   clpd report /data/kept/ablation-arith/runs      # reads the copy as it read the runs
#
# Run outputs are lost with the machine. A later launch of a resumable sweep
# (scripts/reproduce_ablation.sh) can start from such a copy: a run dir with summary.json is skipped
# as finished. Files already in DEST are never overwritten.
set -euo pipefail
usage="usage: bash scripts/archive_runs.sh SRC DEST"
SRC="${1:?$usage}"
DEST="${2:?$usage}"
[ -d "$SRC" ] || { echo "archive_runs.sh: SRC '$SRC' is not a directory; $usage" >&2; exit 1; }
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
cd "$SRC"
n=0
while IFS= read -r -d '' file; do
    if [ -e "$DEST/$file" ]; then
        echo "archive_runs.sh: keeping the existing $DEST/$file" >&2
        continue
    fi
    mkdir -p "$DEST/$(dirname "$file")"
    cp -p "$file" "$DEST/$file"
    n=$((n + 1))
done < <(find . \( -name tensorboard -o -name '*.tmp' \) -prune -o -type f \
    \( -path '*/checkpoints/final/manifest.json' -o \! -path '*/checkpoints/*' \
       \( -path '*/.hydra/*.yaml' -o -name status.json -o -name summary.json -o -name metrics.jsonl \
          -o -name metrics.json -o -name teachers.json -o -name 'report.md' -o -name 'report.csv' -o -name 'report.png' \) \) \
    -print0)
echo "archive_runs.sh: $n files copied into $DEST"
