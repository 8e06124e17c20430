"""Prompt format and tokenization with a loss mask.

The plain format is lm-evaluation-harness's gsm8k ``doc_to_text`` (``Question: ...\\nAnswer:``)
and its target delimiter (one space), so a model trained here is scored the way lm-eval scores
it. With ``chat_template=True`` the question goes through the tokenizer's chat template instead.
"""

from __future__ import annotations

from typing import Any, Dict, List

from clpd.data.records import Problem
from clpd.errors import ClpdError

PROMPT = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100  # label of the tokens the loss skips (the prompt), as torch's cross_entropy expects

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


def encode_example(problem: Problem, tokenizer: Any, chat_template: bool, max_len: int) -> Dict[str, Any]:
    """``input_ids`` = prompt + target + eos; ``labels`` = -100 on the prompt, the ids elsewhere.

    Prompt and target are tokenized separately and concatenated, so the boundary of the loss mask
    is exact (a joint tokenization may merge the last prompt token with the first target token).
    Longer than ``max_len``: cut to ``max_len`` (the end of the target goes) and ``truncated`` is True.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ClpdError(f"the tokenizer {_name(tokenizer)} has no eos token, so a model could not learn to stop")
    prompt = encode_prompt(problem, tokenizer, chat_template)
    target = _ids(tokenizer, target_text(problem, chat_template)) + [int(eos)]
    input_ids = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    truncated = len(input_ids) > max_len
    if truncated:
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def cut_at_stop(text: str) -> str:
    """A generated continuation up to (not including) the first stop string, as lm-eval's ``until``."""
    cut = len(text)
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]
