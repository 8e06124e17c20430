"""The schemas of a model: a student or teacher (pretrained or from scratch), a student's LoRA
adapters and the layers it keeps when it is cut from another model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional


from clpd.errors import Problems
from clpd.config.enums import Arch


@dataclass
class ModelConfig:
    """A student or teacher: a pretrained model (``path``) or a from-scratch architecture.

    ``path`` is a Hugging Face id or a local directory written by ``save_pretrained`` (a clpd
    checkpoint is one). Without ``path`` the model is built from the architecture fields with
    random weights, and the tokenizer is ``tokenizer`` (an id or directory) or, when that is
    empty too, clpd's character-level tokenizer.
    """

    name: str = "tiny"
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    arch: Arch = Arch.llama
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: same as num_heads (no grouped-query attention)
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tie_embeddings: bool = True
    # Output rows of a from-scratch model (None: the tokenizer's size). Real families pad them:
    # Qwen2.5 0.5B-3B have 151936 rows, 7B 152064, for a tokenizer of 151665 tokens.
    vocab_size: Optional[int] = None
    trust_remote_code: bool = False
    # Where this config sits, for error messages: "student." names the full key (student.num_heads);
    # a teacher is named by its ladder name instead. Not a field (ClassVar), so not in the config.
    KEY_PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        p = self._problems()
        p.raise_if_any(f"invalid {self.KEY_PREFIX.rstrip('.') or f'model {self.name!r}'} config: ")

    def _problems(self) -> List[str]:
        p = Problems()
        k = self.KEY_PREFIX
        # A student cut from another model (StudentConfig.init_from) takes its architecture from there.
        if self.path is None and not getattr(self, "init_from", None):
            for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
                p.check(getattr(self, key) > 0, f"{k}{key}={getattr(self, key)} must be > 0")
            p.check(self.num_heads <= 0 or self.hidden_size % self.num_heads == 0,
                    f"{k}hidden_size={self.hidden_size} must be divisible by {k}num_heads={self.num_heads}")
            kv = self.num_kv_heads or self.num_heads
            p.check(kv > 0 and self.num_heads % kv == 0,
                    f"{k}num_heads={self.num_heads} must be divisible by {k}num_kv_heads={self.num_kv_heads}")
        p.check(self.gguf_file is None or self.path is not None or getattr(self, "init_from", None),
                f"{k}gguf_file needs {k}path (the repo or folder that holds it)")
        return p



@dataclass
class LoraConfig:
    """LoRA adapters through peft. Off for the tiny from-scratch students (full fine-tuning)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge_on_save: bool = False  # also write checkpoints/merged: the base with the adapter folded in

    def __post_init__(self) -> None:
        p = Problems()
        p.check(self.r >= 1, f"student.lora.r={self.r} must be >= 1")
        p.check(0.0 <= self.dropout < 1.0, f"student.lora.dropout={self.dropout} must be in [0, 1)")
        p.check(len(self.target_modules) > 0, "student.lora.target_modules must name at least one module")
        p.raise_if_any("invalid student.lora config: ")



@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)
    # A student cut from another model (DistilBERT's initialisation; Minitron's depth pruning):
    # its embeddings, final norm, head and the blocks ``keep_layers`` (or every ``keep_every``-th
    # block from the first: 0, k, 2k, ...; neither: all of them), in the source's order. The source
    # is a teacher of the ladder, by name (a from-scratch one once it is trained), or a folder, hub
    # id or pkg: path (with ``gguf_file`` naming the GGUF file in it). The student shares the
    # source's tokenizer; ``path`` and the architecture fields are unused.
    init_from: Optional[str] = None
    keep_layers: Optional[List[int]] = None
    keep_every: Optional[int] = None
    KEY_PREFIX: ClassVar[str] = "student."

    def _problems(self) -> List[str]:
        p = super()._problems()
        p.check(self.init_from is None or self.path is None,
                f"student.path={self.path} and student.init_from={self.init_from}: set one (path loads a model "
                f"as it is; init_from cuts the student from a model)")
        for key in ("keep_layers", "keep_every"):
            p.check(getattr(self, key) is None or self.init_from is not None,
                    f"student.{key} needs student.init_from (the model whose layers are kept)")
        _check_keep(p, "student.", self.keep_layers, self.keep_every)
        return p



def _check_keep(p: Problems, k: str, keep_layers: Optional[List[int]], keep_every: Optional[int]) -> None:
    """The layers a cut keeps, as far as they can be checked without the source's layer count
    (that range is checked against its config: clpd.preflight)."""
    p.check(keep_layers is None or keep_every is None,
            f"{k}keep_layers and {k}keep_every: set one (the layers to keep, or every k-th)")
    if keep_layers is not None:
        layers = list(keep_layers)
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        p.check(len(layers) > 0, f"{k}keep_layers=[] must name at least one layer (null keeps all)")
        p.check(not repeated, f"{k}keep_layers={layers}: {repeated} repeated; each layer can be kept once")
        p.check(all(i >= 0 for i in layers),
                f"{k}keep_layers={layers}: layers are numbered from 0 (negative: {[i for i in layers if i < 0]})")
    p.check(keep_every is None or keep_every >= 1, f"{k}keep_every={keep_every} must be >= 1")
