"""The training loop and what it needs: one optimizer step, the batches, the state it returns and
resumes from, its log, stop signals, checkpoints and resume, and torchrun's ranks."""
