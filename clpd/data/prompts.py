"""Prompt format and tokenization with a loss mask.

The plain format is lm-evaluation-harness's gsm8k ``doc_to_text`` (``Question: ...\\nAnswer:``)
and its target delimiter (one space), so a model trained here is scored the way lm-eval scores
it. With ``chat_template=True`` the question goes through the tokenizer's chat template instead.

Evaluation prompts may start with solved examples (``benchmark.num_fewshot``), drawn and joined
as lm-eval's gsm8k does (:func:`draw_fewshot`): plain, ``Question: q\\nAnswer: solution`` blocks
separated by a blank line before the question; with the chat template, one user/assistant turn
per example (lm-eval's ``--apply_chat_template --fewshot_as_multiturn``).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

from clpd.data.records import Problem
from clpd.errors import ClpdError
from clpd.data.records import IGNORE_INDEX

log = logging.getLogger("clpd.data")

PROMPT = "Question: {question}\nAnswer:"

# lm-eval's gsm8k ``until`` ("Question:", "</s>", "<|im_end|>"), plus "\n\n" of its earlier versions:
# a solution never contains a blank line, so a model that writes one has started something else.
STOP_STRINGS = ["Question:", "</s>", "<|im_end|>", "\n\n"]
# Through a chat template the answer ends with the assistant's turn (eos): a chat model writes
# paragraphs, and "\n\n" would cut its answer before the result (measured: SmolLM2-135M-Instruct
# stopped before its final number on 3 of 4 GSM8K problems).
CHAT_STOP_STRINGS = ["Question:", "</s>", "<|im_end|>"]


def stop_strings(chat_template: bool) -> List[str]:
    return CHAT_STOP_STRINGS if chat_template else STOP_STRINGS


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


# lm-eval's fewshot_delimiter: what follows each solved example in a plain few-shot prompt.
FEWSHOT_DELIMITER = "\n\n"


def draw_fewshot(problems: Sequence[Problem], pool: Sequence[Problem], k: int, seed: int = 1234,
                 same_split: bool = False) -> List[List[Problem]]:
    """The solved examples shown before each of ``problems``: for each, in order, ``k`` drawn from
    ``pool`` by one ``random.Random(seed)``, as lm-eval's default few-shot sampler draws them
    (``rnd.sample(docs, k)``; with ``same_split``, k + 1 and the problem itself left out). The
    draw for a problem depends on the problems before it: the first N problems of a split get the
    same examples whatever ``benchmark.eval_limit`` is."""
    if k <= 0:
        return [[] for _ in problems]
    n = k + 1 if same_split else k
    if n > len(pool):
        raise ClpdError(f"benchmark.num_fewshot={k}: the few-shot split has only {len(pool)} problems")
    rnd = random.Random(seed)
    return [[shot for shot in rnd.sample(list(pool), n) if shot.id != problem.id][:k] for problem in problems]


def prompt_text(problem: Problem, tokenizer: Any, chat_template: bool, shots: Sequence[Problem] = ()) -> str:
    if not chat_template:
        solved = "".join(PROMPT.format(question=s.question) + target_text(s, False) + FEWSHOT_DELIMITER for s in shots)
        return solved + PROMPT.format(question=problem.question)
    if not getattr(tokenizer, "chat_template", None):
        raise ClpdError(f"benchmark.chat_template=true but the tokenizer {_name(tokenizer)} has no chat template; "
                        f"use benchmark.chat_template=false")
    turns = [t for s in shots for t in ({"role": "user", "content": s.question},
                                        {"role": "assistant", "content": target_text(s, True)})]
    return tokenizer.apply_chat_template([*turns, {"role": "user", "content": problem.question}],
                                         tokenize=False, add_generation_prompt=True)


def target_text(problem: Problem, chat_template: bool) -> str:
    return problem.solution if chat_template else " " + problem.solution


def _ids(tokenizer: Any, texts: Sequence[str]) -> List[List[int]]:
    # One batched call: a fast tokenizer encodes a list in Rust, about 10x faster than text by text.
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def encode_prompts(problems: Sequence[Problem], tokenizer: Any, chat_template: bool,
                   shots: Optional[Sequence[Sequence[Problem]]] = None) -> List[List[int]]:
    """Token ids of each prompt alone, for generation (no BOS: the prompt text is all there is);
    ``shots[i]`` are the solved examples shown before problem i."""
    shots = shots if shots is not None else [()] * len(problems)
    return _ids(tokenizer, [prompt_text(p, tokenizer, chat_template, s) for p, s in zip(problems, shots)])


def encode_prompt(problem: Problem, tokenizer: Any, chat_template: bool, shots: Sequence[Problem] = ()) -> List[int]:
    return encode_prompts([problem], tokenizer, chat_template, [shots])[0]


def encode_examples(problems: Sequence[Problem], tokenizer: Any, chat_template: bool, max_len: int,
                    overlong: str = "drop") -> List[Optional[Dict[str, Any]]]:
    """``input_ids`` = prompt + target + eos; ``labels`` = -100 on the prompt, the ids elsewhere.

    Prompt and target are tokenized separately and concatenated, so the boundary of the loss mask
    is exact (a joint tokenization may merge the last prompt token with the first target token).
    Longer than ``max_len``: ``overlong="drop"`` gives None; ``"truncate_left"`` cuts the
    prompt's left side (``truncated`` is True), and gives None when even the target with one
    prompt token does not fit. The target is never cut: an answer without its end teaches nothing.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ClpdError(f"the tokenizer {_name(tokenizer)} has no eos token, so a model could not learn to stop")
    prompts = encode_prompts(problems, tokenizer, chat_template)
    targets = _ids(tokenizer, [target_text(p, chat_template) for p in problems])
    return [_example(p.id, prompt, target + [int(eos)], max_len, getattr(overlong, "value", overlong))
            for p, prompt, target in zip(problems, prompts, targets)]


def encode_example(problem: Problem, tokenizer: Any, chat_template: bool, max_len: int,
                   overlong: str = "drop") -> Optional[Dict[str, Any]]:
    return encode_examples([problem], tokenizer, chat_template, max_len, overlong)[0]


def _example(id: Any, prompt: List[int], target: List[int], max_len: int, overlong: str) -> Optional[Dict[str, Any]]:
    cut = len(prompt) + len(target) - max_len
    if cut > 0:
        if overlong == "drop" or cut >= len(prompt):
            return None
        prompt = prompt[cut:]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
            "truncated": cut > 0, "id": id}


def encode_problems(problems: List[Problem], tokenizer: Any, chat_template: bool, max_len: int,
                    overlong: str = "drop") -> Tuple[List[Problem], List[Dict[str, Any]], Dict[str, int]]:
    """Encode the training problems; returns the problems kept, their examples, and how many were
    dropped or left-truncated for being longer than ``max_len`` (also logged). Refuses, before any
    training, when none is left."""
    encoded = encode_examples(problems, tokenizer, chat_template, max_len, overlong)
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


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """A generated continuation up to (not including) the first stop string, as lm-eval's ``until``."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]
