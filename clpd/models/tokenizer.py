"""clpd's character-level tokenizer for from-scratch models.

One token per character keeps numbers digit by digit, which is what lets a model of a few hundred
thousand parameters learn exact arithmetic on a CPU. It is an ordinary ``tokenizers`` WordLevel
model wrapped in transformers' fast tokenizer class, so ``AutoTokenizer.from_pretrained(dir)``
reloads a saved copy without clpd installed. The vocabulary is fixed (printable ASCII and newline),
so every tokenizer built here is identical: students and teachers built from scratch share it.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
CHARACTERS = ["\n"] + [chr(i) for i in range(32, 127)]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Split every character into its own piece; "[\s\S]" also matches the newline.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join pieces with no separator
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.name_or_path = "clpd-char"
    return tokenizer
