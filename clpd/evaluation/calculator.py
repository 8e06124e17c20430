"""Calculator-assisted decoding: the model writes ``<<48/2=`` and the calculator writes ``24>>``.

GSM8K's solutions annotate each calculation as ``<<48/2=24>>24`` (clpd's arith problems too), so a
model trained on them opens an annotation, writes the expression and an ``=``, then the result.
With the calculator on, the result is not left to the model: :class:`CalculatorProcessor`, a
``LogitsProcessor`` given to ``model.generate``, computes the expression with :func:`calculate` and
forces the tokens of ``RESULT>>`` one step at a time. A forced token is generated like any other
(it goes through the model and into the KV cache), so the model reads the result and goes on.

:func:`calculate` evaluates only arithmetic: numbers, ``+ - * /``, parentheses, a sign, and ``**``
with a small whole exponent, in exact fractions. Anything else (names, calls, attributes, strings,
comparisons, numbers or results beyond ±1e15, division by zero) is refused with a one-line reason
before any large computation; a refused expression forces nothing and the model writes the result
itself, as it would without the calculator.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import weakref
from collections import deque
from fractions import Fraction
from typing import Callable, Deque, Dict, List, Sequence, Union

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

MAX_CHARS = 100  # an annotation's expression is short; GSM8K's longest is well under this
MAX_MAGNITUDE = 10 ** 15  # every number and intermediate result stays within ±1e15
MAX_EXPONENT = 10  # ``**`` takes a whole exponent within ±10
# Numerator and denominator together: exact fractions grow with every operation; this bounds the
# work of a short expression (1e15 to the 10th is under 500 bits) and refuses what would not be.
MAX_BITS = 4096
# GSM8K's annotations write at most 3 decimals (20/5000=.004), always the exact value: 4 places keep
# every such result exact, and cut a repeating decimal (1/3) to a short number a model copies.
DECIMALS = 4
# Characters a model may write for the operators: times, divided by, the minus sign.
SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-"})

Number = Union[Fraction, int, float]


class CalculationRefused(ValueError):
    """An expression the calculator does not evaluate; the message is the reason, in one line."""


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculationRefused(f"exponent {exponent} is not a whole number")
    if abs(exponent) > MAX_EXPONENT:
        raise CalculationRefused(f"exponent {exponent} is beyond ±{MAX_EXPONENT}")
    if abs(exponent) * (base.numerator.bit_length() + base.denominator.bit_length()) > MAX_BITS:
        raise CalculationRefused("result too large to compute exactly")
    return base ** int(exponent)


OPERATORS: Dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: _power,
}
REFUSED_NODES = {
    ast.Name: "names are not allowed", ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed", ast.Subscript: "subscripts are not allowed",
    ast.Compare: "comparisons are not allowed", ast.BoolOp: "boolean operators are not allowed",
    ast.Tuple: "tuples are not allowed (a comma in a number?)", ast.Lambda: "lambdas are not allowed",
}
OPERATOR_SYMBOLS = {ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>",
                    ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.Invert: "~", ast.Not: "not"}


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise CalculationRefused("a number or result beyond ±1e15")
    if value.numerator.bit_length() + value.denominator.bit_length() > MAX_BITS:
        raise CalculationRefused("result too large to compute exactly")
    return value


def _number(value: object) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "strings" if isinstance(value, (str, bytes)) else f"{type(value).__name__} literals"
        raise CalculationRefused(f"{kind} are not allowed")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationRefused("a number or result beyond ±1e15")
    # repr: the shortest text of the float, so 0.1 is 1/10 exactly, not its binary neighbour
    return _bounded(Fraction(repr(value)) if isinstance(value, float) else Fraction(value))


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.BinOp, ast.UnaryOp)) and type(node.op) not in OPERATORS:
        raise CalculationRefused(f"operator {OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)} "
                                 "is not allowed")
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left), _value(node.right)
        try:
            return _bounded(OPERATORS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculationRefused("division by zero") from None
    raise CalculationRefused(REFUSED_NODES.get(type(node), f"{type(node).__name__} is not arithmetic"))


def calculate(expr: str) -> Fraction:
    """The exact value of an arithmetic expression (``2*(3+4)``, ``48 ÷ 2``, ``.5/100``, ``2**3``).

    Raises :class:`CalculationRefused` with a one-line reason for anything else."""
    text = expr.translate(SYMBOLS).strip()
    if not text:
        raise CalculationRefused("empty expression")
    if len(text) > MAX_CHARS:
        raise CalculationRefused(f"longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculationRefused("not an arithmetic expression (syntax error)") from None
    return _value(tree.body)


def format_result(value: Number) -> str:
    """The text written after ``=``: a whole number as such (``24``, ``-3``), else rounded half away
    from zero to :data:`DECIMALS` places with the trailing zeros dropped (``2.5``, ``0.3333``)."""
    exact = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    if exact.denominator == 1:
        return str(exact.numerator)
    scale = 10 ** DECIMALS
    scaled = math.floor(abs(exact) * scale + Fraction(1, 2))
    whole, part = divmod(scaled, scale)
    text = f"{whole}.{part:0{DECIMALS}d}".rstrip("0").rstrip(".")
    return f"-{text}" if exact < 0 and scaled else text


# --- decoding ------------------------------------------------------------------------------------

# The end of a row's text when it has just written the ``=`` of an annotation: ``<<EXPR=``.
OPEN_ANNOTATION = re.compile(r"<<([^<>=]*)=\Z")
# Tokens decoded to find the annotation: enough for an expression of MAX_CHARS characters (a token
# writes at least one) and the ``<<``; a longer one is not seen and the model goes on alone.
WINDOW = MAX_CHARS + 8

_EQUALS: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, frozenset]" = weakref.WeakKeyDictionary()


def equals_tokens(tokenizer: PreTrainedTokenizerBase) -> frozenset:
    """The ids whose text contains ``=``: only a row whose last token is one of them can have just
    opened a calculation. Decoded once per tokenizer (GPT-2's 50k tokens in one batched call)."""
    if tokenizer not in _EQUALS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _EQUALS[tokenizer] = frozenset(i for i, text in enumerate(texts) if "=" in text)
    return _EQUALS[tokenizer]


class CalculatorProcessor(LogitsProcessor):
    """Forces ``RESULT>>`` after each ``<<EXPR=`` that a row of the batch writes (or that its prompt
    ends with), in greedy and sampled ``model.generate`` alike.

    ``generate`` applies its own processors, then the ones it is given, then (when sampling) the
    temperature, top-k and top-p warpers: a forced row leaves them one finite score, which every
    warper keeps, so the forced token is drawn whatever the sampling settings.

    ``calls[row]`` records each calculation of a row in order: ``{"expr": ..., "result": ...}``,
    or ``{"expr": ..., "refused": reason}`` when nothing was forced. A row that has ended (its last
    token is eos or padding) triggers nothing."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rows: int):
        self.tokenizer = tokenizer
        self.equals = equals_tokens(tokenizer)
        self.ends = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
        self.queues: List[Deque[int]] = [deque() for _ in range(rows)]
        self.calls: List[List[dict]] = [[] for _ in range(rows)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            queue = self.queues[row]
            if token in self.ends:
                queue.clear()
                continue
            if not queue and token in self.equals:
                queue.extend(self._open(row, input_ids[row, -WINDOW:].tolist()))
            if queue:
                forced = queue.popleft()
                scores[row] = -math.inf
                scores[row, forced] = 0.0
        return scores

    def _open(self, row: int, tail: Sequence[int]) -> List[int]:
        """The tokens to force when ``tail`` ends with an open annotation (recorded), else none."""
        match = OPEN_ANNOTATION.search(self.tokenizer.decode(tail, skip_special_tokens=True))
        if not match:
            return []
        expr = match.group(1)
        try:
            result = format_result(calculate(expr))
        except CalculationRefused as refused:
            self.calls[row].append({"expr": expr, "refused": str(refused)})
            return []
        self.calls[row].append({"expr": expr, "result": result})
        return self.tokenizer.encode(result + ">>", add_special_tokens=False)


def summarize_calls(calls: Sequence[Sequence[dict]]) -> dict:
    """The ``calculator`` entry of the metrics: the calculations of all rows, and how many were refused."""
    flat = [call for row in calls for call in row]
    return {"enabled": True, "calls": len(flat), "refused": sum("refused" in call for call in flat)}
