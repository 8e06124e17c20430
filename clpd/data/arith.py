"""A seeded generator of short GSM8K-format word problems with a known number of steps.

Each problem is a story -- a person, an item, a start count, then k operations -- and a
solution with one calculator-annotated line per operation, so ``num_steps == k`` is the
difficulty. Everything is kept short on purpose: the students that learn this are tiny
character-level models trained on a CPU, where every character costs.

The problems are a pure function of the split name and the generator fields of the config:
``random.Random`` is seeded with a string (hashed with SHA-512, not Python's salted ``hash``).
Train and test are disjoint by construction: a stable hash of the question text puts every
possible question in exactly one split (1 in 8 goes to test), and each split's generator
skips the questions that belong to the other. So neither split depends on the other's size,
and the first N problems of a split do not depend on how many are asked for.

A third split, validation (``test_size`` problems), serves to choose settings without looking at
the test split: drawn from its own stream among the questions of the test side (which no training
split of any seed can hold), skipping the test split's own questions.
"""

from __future__ import annotations

import hashlib
import random
from typing import List, Tuple

from clpd.config.schema import BenchmarkConfig
from clpd.data.records import Problem
from clpd.errors import ClpdError

SPLITS = ("train", "validation", "test")
TEST_BUCKETS = 8  # one question in TEST_BUCKETS belongs to the test split

FEMALE = ("Ava", "Zoe", "Mia", "Eve", "Amy", "Ivy", "Liz", "Ada")
MALE = ("Ben", "Max", "Leo", "Tom", "Ian", "Dan", "Joe", "Sam")
FOOD = ("apples", "pears", "plums", "cookies", "eggs", "nuts")  # only food can be eaten
THINGS = ("marbles", "stickers", "coins", "pens", "cards", "shells", "books", "toys")

# Question sentences. ``{P}``/``{p}``: he/she, ``{N}``: the name, ``{n}``: the operand,
# ``{x}``: the items, ``{h}``: his/her.
START = ("{N} has {a} {x}.", "{N} has {a} {x}.", "{N} starts with {a} {x}.")
ADD = ("{P} buys {n} more.", "{P} finds {n} more.", "{P} is given {n}.", "{P} picks {n} more.",
       "{P} gets {n} more.")
SUB = ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.", "{P} gives {n} away.")
EAT = ("{P} eats {n}.",)
MUL = {2: ("{P} doubles them.", "{h} {x} double."), 3: ("{P} triples them.", "{h} {x} triple.")}
DIV = ("{P} splits them into {n} equal piles, keeps one.", "{P} keeps one of {n} equal shares.", "{P} keeps 1/{n} of them.")
ASK = ("How many {x} does {N} have now?", "How many {x} does {p} have now?", "How many {x} does {N} have?",
       "How many {x} now?")

# Solution-line prefixes per operation (the calculation follows, after ": ").
S_ADD = ("{P} gets {n} more", "{P} adds {n}", "Plus {n}", "{n} more")
S_SUB = ("{P} has {n} fewer", "Minus {n}", "{n} fewer", "Take away {n}")
S_MUL = {2: ("Doubled", "{P} doubles them", "Twice as many"), 3: ("Tripled", "{P} triples them", "3 times as many")}
S_DIV = ("{P} keeps 1 of {n} shares", "Split into {n}", "One share of {n}")


def _calc(a: int, op: str, b: int, r: int) -> str:
    e = f"{a}{op}{b}"
    return f"{e} = <<{e}={r}>>{r}"


def _is_test(question: str) -> bool:
    h = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") % TEST_BUCKETS == 0


def _one(rng: random.Random, cfg: BenchmarkConfig) -> Tuple[str, str, int, int]:
    """One problem: (question, solution, answer, k)."""
    lo, hi = cfg.min_value, cfg.max_value
    female = rng.random() < 0.5
    name = rng.choice(FEMALE if female else MALE)
    pron, poss = ("she", "her") if female else ("he", "his")
    edible = rng.random() < 0.4
    items = rng.choice(FOOD if edible else THINGS)
    fmt = dict(N=name, p=pron, P=pron.capitalize(), h=poss.capitalize(), x=items)

    k = rng.randint(1, cfg.max_steps)
    v = rng.randint(lo, hi)
    q = [rng.choice(START).format(a=v, **fmt)]
    s: List[str] = []
    for _ in range(k):
        ops = ["add"]
        if v >= lo:
            ops.append("sub")
        if 0 < v <= hi:
            ops.append("mul")
        divisors = [d for d in (2, 3, 4) if v > 0 and v % d == 0]
        if divisors:
            ops.append("div")
        op = rng.choice(ops)
        if op == "add":
            n = rng.randint(lo, hi)
            r, sym, qs, ss = v + n, "+", ADD, S_ADD
        elif op == "sub":
            n = rng.randint(lo, min(hi, v))
            r, sym, qs, ss = v - n, "-", SUB + (EAT if edible else ()), S_SUB
        elif op == "mul":
            n = rng.choice((2, 3))
            r, sym, qs, ss = v * n, "*", MUL[n], S_MUL[n]
        else:
            n = rng.choice(divisors)
            r, sym, qs, ss = v // n, "/", DIV, S_DIV
        q.append(rng.choice(qs).format(n=n, **fmt))
        line = _calc(v, sym, n, r)
        if rng.random() < 0.7:  # a short reason before the calculation, most of the time
            line = rng.choice(ss).format(n=n, **fmt) + ": " + line
        s.append(line)
        v = r
    q.append(rng.choice(ASK).format(**fmt))
    s.append(f"#### {v}")
    return " ".join(q), "\n".join(s), v, k


def generate(split: str, cfg: BenchmarkConfig) -> List[Problem]:
    """``cfg.train_size`` (split "train") or ``cfg.test_size`` (splits "validation", "test") problems."""
    if split not in SPLITS:
        raise ClpdError(f"benchmark=arith has no split '{split}' (splits: {', '.join(SPLITS)})")
    size = cfg.train_size if split == "train" else cfg.test_size
    # Only the fields that define the problems go into the seed, so they are a pure function of them.
    rng = random.Random(f"clpd-arith/{cfg.seed}/{split}/{cfg.max_steps}/{cfg.min_value}/{cfg.max_value}")
    want_test = split != "train"
    exclude = {p.question for p in generate("test", cfg)} if split == "validation" else set()
    out: List[Problem] = []
    tries = 0
    while len(out) < size:
        tries += 1
        if tries > 100 * size + 10000:
            raise ClpdError(f"benchmark=arith: could not generate {size} {split} problems; widen "
                            f"benchmark.min_value..max_value ({cfg.min_value}..{cfg.max_value}) or raise max_steps")
        question, solution, answer, k = _one(rng, cfg)
        if _is_test(question) != want_test or question in exclude:
            continue
        out.append(Problem(id=f"arith-{split}-{len(out)}", question=question, solution=solution,
                           answer=str(answer), num_steps=k, source="arith"))
    return out
