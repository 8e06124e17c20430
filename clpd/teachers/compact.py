"""The compact rows of stored teacher outputs (:mod:`clpd.teachers.store`): each answer position's
top-k in a fixed number of bits, rows back to back in one bit stream, so that any range of rows is
decoded from its own bytes alone (vectorised numpy, no loop over rows).

One row, in this order (big-endian fields; ``l = floor(log2(width / k))``):

    low        k * l bits              the teacher's k ids (vocabulary rows), sorted ascending: their
                                       low l bits
    high       k + ((width-1) >> l)    ...and their high bits, Elias-Fano: bit ``(id >> l) + i`` set
                                       for the i-th smallest id
    top        ceil(log2 k) bits       which of the sorted ids has the largest logit
    values     (k - 1) * 10 bits       the other logits' gaps d >= 0 below the largest, mu-law coded
                                       against the row's scale: ``round(1023 log(1 + 4 d/s) / log 5)``
    scale      6 bits                  s: the row's largest gap rounded up to a power of 2^(1/4), in
                                       [2^-8, 2^7.75] (a gap beyond 215 is stored as 215: its
                                       probability is below fp32's smallest, as the divergences read it)
    tail       20 bits                 the tail's logsumexp less the largest logit, fixed point in
                                       steps of 2^-14 over [-48, 16)

k = 32 of 151,936 rows: 453 + 5 + 310 + 6 + 20 = 794 bits, 99.25 bytes (format 1: 260).

Why these, by measurement (the relative error of the summed divergence against the fp32 top-k,
worst of the six divergences over 16-row micro-batches, at T = 1 and 2; the losses in fp64 so that
fp32 rounding of a near-zero KL does not count as the store's; a 0.1M-parameter teacher trained 60
steps on arith against a student trained 20, k = 8 and 32; 151,936-row logits with a realistic
spread (a Gaussian bulk and a boosted head, top-1 probability 0.006 to 0.94 at the 10th and 90th percentiles) against a student near
them and one far, k = 8, 32, 128; the random Qwen2 of ``python -m clpd.bench.store size``):

- Ids. The loss reads a row's ids as a set with their values, so their order is free: sorted,
  Elias-Fano takes 453 bits for 32 ids where 18-bit ids take 576 (the least any code can, log2 of
  the number of 32-sets, is 433), and a row keeps a fixed size.
- Values. ``log_softmax`` over the values and the tail does not change when a row's values and tail
  move together, so the largest logit is not kept: rows come back as gaps below it. Within 99.25
  bytes the values get 10 bits. A gap's error costs loss in proportion to its probability, so the
  code is finest next to the largest logit (mu-law), against a scale per row (logits of a random
  model spread 0.1, a trained one's 5 to 20). Worst 16-row error: 2.7e-4 on the trained teacher,
  3.6e-4 (T = 1) and 9.1e-4 (T = 2, k = 8) on the realistic logits near a student; summed over 256
  rows at most 9.7e-5 anywhere. 9-bit codes: up to 2.0e-3; 8 bits with a per-row scale, uniform:
  8.2e-3; 16 bits (fp16 gaps): 6.3e-5, but 122 bytes a row; bf16 and fp16 of the raw logits (large
  logits keep fewer bits of their differences): 2.6e-2 and 3.2e-3.
- Tail. Nearly flat rows (a random model) put almost all the mass in the tail, where the tail's
  precision is the top k's mass: 16 bits in steps of 2^-10 gave 1.1e-3 there, these 20 bits 6.5e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

VALUE_BITS = 10
MU = 4.0  # the mu-law's curvature: steps near the largest logit 1/5 of those at the scale
SCALE_BITS = 6
SCALE_STEPS = 4  # scale grid: powers of 2^(1/4) from 2^-8 (the code 32 is 1)
TAIL_BITS = 20
TAIL_LOW = -48.0  # a tail below exp(-48) times the largest logit's probability is stored as exp(-48)
TAIL_STEPS = 2 ** 14  # fixed point: steps of 2^-14, [-48, 16)


@dataclass(frozen=True)
class Layout:
    """Where each field of a row of ``k`` ids among ``width`` vocabulary rows lies, in bits."""
    k: int
    width: int

    @property
    def low_bits(self) -> int:
        return max(0, int(math.floor(math.log2(self.width / self.k))))

    @property
    def high_bits(self) -> int:
        return self.k + ((self.width - 1) >> self.low_bits)

    @property
    def top_bits(self) -> int:
        return (self.k - 1).bit_length()

    def fields(self) -> Tuple[Tuple[str, int], ...]:
        """(name, bits) of each field, in row order."""
        return (("low", self.k * self.low_bits), ("high", self.high_bits), ("top", self.top_bits),
                ("values", (self.k - 1) * VALUE_BITS), ("scale", SCALE_BITS), ("tail", TAIL_BITS))

    @property
    def row_bits(self) -> int:
        return sum(bits for _, bits in self.fields())

    def stream_bytes(self, rows: int) -> int:
        return (rows * self.row_bits + 7) // 8


# --- fixed-width unsigned integers as bits -----------------------------------------------------------

def to_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[..., c] non-negative integers below 2**bits -> [..., c * bits] uint8 bits, each big-endian."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    out = (np.asarray(values, dtype=np.int64)[..., None] >> shifts) & 1
    return out.astype(np.uint8).reshape(*out.shape[:-2], out.shape[-2] * bits)


def from_bits(bits: np.ndarray, width: int) -> np.ndarray:
    """The inverse of :func:`to_bits`: [..., c * width] bits -> [..., c] int64 (``width`` >= 1)."""
    grouped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // width, width).astype(np.int64)
    return grouped @ (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))


# --- ids: Elias-Fano ----------------------------------------------------------------------------------

def ids_to_bits(ids: np.ndarray, layout: Layout) -> np.ndarray:
    """[n, k] ids, ascending in each row -> [n, low + high bits]."""
    n, k, low = ids.shape[0], layout.k, layout.low_bits
    ids = ids.astype(np.int64)
    high = np.zeros((n, layout.high_bits), dtype=np.uint8)
    high[np.arange(n)[:, None], (ids >> low) + np.arange(k)] = 1
    return np.concatenate([to_bits(ids & ((1 << low) - 1), low), high], axis=1)


def ids_from_bits(bits: np.ndarray, layout: Layout) -> np.ndarray:
    """The inverse of :func:`ids_to_bits`: [n, low + high bits] -> [n, k] int64, ascending."""
    n, k, low = bits.shape[0], layout.k, layout.low_bits
    lows = from_bits(bits[:, :k * low], low) if low else np.zeros((n, k), dtype=np.int64)
    # Every row has exactly k bits set, and nonzero() lists them row by row, left to right.
    _, at = np.nonzero(bits[:, k * low:])
    highs = at.reshape(n, k) - np.arange(k)
    return (highs << low) | lows


# --- values: gaps below the largest logit -------------------------------------------------------------

def _scale_code(gap: np.ndarray) -> np.ndarray:
    exponent = np.ceil(SCALE_STEPS * np.log2(np.maximum(gap, 2.0 ** -30)))
    return np.clip(exponent + 2 ** (SCALE_BITS - 1), 0, 2 ** SCALE_BITS - 1).astype(np.int64)


def _scale(code: np.ndarray) -> np.ndarray:
    return np.exp2((code - 2 ** (SCALE_BITS - 1)) / SCALE_STEPS)


def gaps_to_codes(gaps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    x = np.clip(gaps / scale[:, None], 0.0, 1.0)
    return np.rint((2 ** VALUE_BITS - 1) * np.log1p(MU * x) / math.log1p(MU)).astype(np.int64)


def codes_to_gaps(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.expm1(codes * (math.log1p(MU) / (2 ** VALUE_BITS - 1))) / MU * scale[:, None]


def encode(indices: np.ndarray, values: np.ndarray, tail_lse: np.ndarray, layout: Layout) -> np.ndarray:
    """The [n, row_bits] bits of n rows of a top-k: ``indices`` [n, k] (distinct in each row),
    ``values`` [n, k] their logits, ``tail_lse`` [n] the logsumexp of the other rows' logits."""
    order = np.argsort(indices, axis=1, kind="stable")
    ids = np.take_along_axis(indices, order, axis=1)
    logits = np.take_along_axis(values, order, axis=1).astype(np.float64)
    n, k = ids.shape
    top = logits.argmax(axis=1)
    largest = logits[np.arange(n), top]
    others = np.arange(k)[None, :] != top[:, None]
    gaps = (largest[:, None] - logits)[others].reshape(n, k - 1)
    scale_code = _scale_code(gaps.max(axis=1, initial=0.0))
    tail = np.rint((tail_lse.astype(np.float64) - largest - TAIL_LOW) * TAIL_STEPS)
    tail = np.clip(np.nan_to_num(tail, neginf=0.0), 0, 2 ** TAIL_BITS - 1)
    return np.concatenate([ids_to_bits(ids, layout), to_bits(top[:, None], layout.top_bits),
                           to_bits(gaps_to_codes(gaps, _scale(scale_code)), VALUE_BITS),
                           to_bits(scale_code[:, None], SCALE_BITS), to_bits(tail[:, None], TAIL_BITS)], axis=1)


def decode(bits: np.ndarray, layout: Layout) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`encode`, up to the values' rounding: (indices int64 [n, k], ascending;
    values fp32 [n, k], each row's largest 0 and the others below it by their gaps; tail_lse fp32 [n],
    relative to the same largest logit)."""
    parts, at = {}, 0
    for name, width in layout.fields():
        parts[name], at = bits[:, at:at + width], at + width
    n, k = bits.shape[0], layout.k
    ids = ids_from_bits(np.concatenate([parts["low"], parts["high"]], axis=1), layout)
    scale = _scale(from_bits(parts["scale"], SCALE_BITS)[:, 0])
    values = np.zeros((n, k), dtype=np.float32)
    top = from_bits(parts["top"], layout.top_bits)[:, 0] if layout.top_bits else np.zeros(n, dtype=np.int64)
    if k > 1:  # the largest stays 0
        others = np.arange(k)[None, :] != top[:, None]
        values[others] = -codes_to_gaps(from_bits(parts["values"], VALUE_BITS), scale).ravel()
    tail = from_bits(parts["tail"], TAIL_BITS)[:, 0] / TAIL_STEPS + TAIL_LOW
    return ids, values, tail.astype(np.float32)


# --- rows in a byte stream ----------------------------------------------------------------------------

def write_rows(stream: np.ndarray, first: int, bits: np.ndarray, layout: Layout) -> None:
    """Put rows ``first, first + 1, ...`` (``bits`` [n, row_bits]) into ``stream`` (uint8, zero where
    nothing is written yet). Rows need not come in order: a byte two writes share gets each one's
    bits OR-ed in, and no bit is written twice."""
    start = first * layout.row_bits
    lead = np.zeros(start % 8, dtype=np.uint8)
    packed = np.packbits(np.concatenate([lead, bits.ravel()]))
    stream[start // 8:start // 8 + packed.size] |= packed


def read_rows(stream: np.ndarray, first: int, count: int, layout: Layout) -> np.ndarray:
    """The [count, row_bits] bits of rows ``first .. first + count - 1``: their bytes alone are read."""
    start, stop = first * layout.row_bits, (first + count) * layout.row_bits
    chunk = np.unpackbits(np.asarray(stream[start // 8:(stop + 7) // 8]))
    return chunk[start % 8:start % 8 + stop - start].reshape(count, layout.row_bits)
