"""Evaluation: batched greedy generation, answer extraction as lm-evaluation-harness does it, and
accuracy by difficulty."""
