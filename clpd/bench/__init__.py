"""The benchmarks, each run as ``python -m clpd.bench.NAME`` (``--help`` says what it measures):
``store`` (stored teacher outputs), ``trl`` (clpd's loop against TRL's GKDTrainer), ``distill`` (one
distillation configuration's speed and memory), ``overhead`` (clpd's bookkeeping per step) and
``checkpoint`` (writing a resumable checkpoint). :mod:`clpd.bench.common` holds what they share."""
