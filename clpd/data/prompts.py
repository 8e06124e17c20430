"""Prompt format and tokenization with a loss mask.

The plain format is lm-evaluation-harness's gsm8k ``doc_to_text`` (``Question: ...\\nAnswer:``)
and its target delimiter (one space), so a model trained here is scored the way lm-eval scores
it. With ``chat_template=True`` the question goes through the tokenizer's chat template instead.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from clpd.data.records import Problem
from clpd.errors import ClpdError
from clpd.losses import IGNORE_INDEX

log = logging.getLogger("clpd.data")

PROMPT = "Question: {question}\nAnswer:"

# lm-eval's gsm8k ``until`` ("Question:", "</s>", "<|im_end|>"), plus "\n\n" of its earlier versions:
# a solution never contains a blank line, so a model that writes one has started something else.
STOP_STRINGS = ["Question:", "</s>", "<|im_end|>", "\n\n"]


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def prompt_text(problem: Problem, tokenizer: Any, chat_template: bool) -> str:
    if not chat_template:
        return PROMPT.format(question=problem.question)
    if not getattr(tokenizer, "chat_template", None):
        raise ClpdError(f"benchmark.chat_template=true but the tokenizer {_name(tokenizer)} has no chat template; "
                        f"use benchmark.chat_template=false")
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                         tokenize=False, add_generation_prompt=True)


def target_text(problem: Problem, chat_template: bool) -> str:
    return problem.solution if chat_template else " " + problem.solution


def _ids(tokenizer: Any, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(problem: Problem, tokenizer: Any, chat_template: bool) -> List[int]:
    """Token ids of the prompt alone, for generation (no BOS: the prompt text is all there is)."""
    return _ids(tokenizer, prompt_text(problem, tokenizer, chat_template))


def encode_example(problem: Problem, tokenizer: Any, chat_template: bool, max_len: int,
                   overlong: str = "drop") -> Optional[Dict[str, Any]]:
    """``input_ids`` = prompt + target + eos; ``labels`` = -100 on the prompt, the ids elsewhere.

    Prompt and target are tokenized separately and concatenated, so the boundary of the loss mask
    is exact (a joint tokenization may merge the last prompt token with the first target token).
    Longer than ``max_len``: ``overlong="drop"`` returns None; ``"truncate_left"`` cuts the
    prompt's left side (``truncated`` is True), and returns None when even the target with one
    prompt token does not fit. The target is never cut: an answer without its end teaches nothing.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ClpdError(f"the tokenizer {_name(tokenizer)} has no eos token, so a model could not learn to stop")
    prompt = encode_prompt(problem, tokenizer, chat_template)
    target = _ids(tokenizer, target_text(problem, chat_template)) + [int(eos)]
    cut = len(prompt) + len(target) - max_len
    if cut > 0:
        if getattr(overlong, "value", overlong) == "drop" or cut >= len(prompt):
            return None
        prompt = prompt[cut:]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
            "truncated": cut > 0, "id": problem.id}


def encode_problems(problems: List[Problem], tokenizer: Any, chat_template: bool, max_len: int,
                    overlong: str = "drop") -> Tuple[List[Problem], List[Dict[str, Any]], Dict[str, int]]:
    """Encode the training problems; returns the problems kept, their examples, and how many were
    dropped or left-truncated for being longer than ``max_len`` (also logged). Refuses, before any
    training, when none is left."""
    encoded = [encode_example(p, tokenizer, chat_template, max_len, overlong) for p in problems]
    kept = [(p, e) for p, e in zip(problems, encoded) if e is not None]
    counts = {"dropped": len(problems) - len(kept), "truncated": sum(e["truncated"] for _, e in kept)}
    if counts["dropped"] or counts["truncated"]:
        log.warning("%d of %d training examples were longer than trainer.max_length=%d: %d dropped, %d left-truncated "
                    "(trainer.overlong=%s)", counts["dropped"] + counts["truncated"], len(problems), max_len,
                    counts["dropped"], counts["truncated"], overlong)
    if not kept:
        raise ClpdError(f"no training examples left: all {len(problems)} are longer than trainer.max_length={max_len} "
                        f"(trainer.overlong={overlong}); raise trainer.max_length"
                        + (" or set trainer.overlong=truncate_left" if overlong == "drop" else ""))
    return [p for p, _ in kept], [e for _, e in kept], counts


def cut_at_stop(text: str) -> str:
    """A generated continuation up to (not including) the first stop string, as lm-eval's ``until``."""
    cut = len(text)
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]
