"""A GGUF file read once.

transformers reads a GGUF file by parsing all of its metadata (the tokenizer's whole vocabulary
included) and dequantizing every tensor, at each read: about 5 s for SmolLM2-135M's config alone on
2 cores and 12 s for its weights, minutes for a 7B model, and one run reads its models several times
(the checks, the student, each teacher, the evaluation). So the first read of a local GGUF file
saves what transformers made of it (config, fp32 weights in safetensors, tokenizer) as a plain model
folder in clpd's cache, built once under a file lock (:mod:`clpd.cache`), and every later read of
the same file loads that folder. The entry is keyed by the file's absolute path, size and
modification time and by the transformers version that converted it, so a changed file or a
different reader converts anew.

The cache is ``$CLPD_CACHE_DIR/gguf`` (default ``$XDG_CACHE_HOME/clpd``, else ``~/.cache/clpd``).
An entry takes the model's fp32 size on disk (540 MB for SmolLM2-135M); delete the folder to free it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from clpd.cache import build_once
from clpd.files import digest, write_json

SOURCE_FILE = "gguf_source.json"  # in an entry: the file it was converted from, written last


def cache_root() -> Path:
    """clpd's cache of converted files: ``$CLPD_CACHE_DIR``, else ``$XDG_CACHE_HOME/clpd``, else ``~/.cache/clpd``."""
    if os.environ.get("CLPD_CACHE_DIR"):
        return Path(os.environ["CLPD_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "clpd"


def converted_folder(folder: str, gguf_file: str, trust_remote_code: bool = False) -> Optional[Path]:
    """The plain model folder that holds ``folder/gguf_file`` as transformers reads it, converted
    now if it is not in the cache; None when there is nothing to convert: the file is not on this
    machine (a hub repo: transformers reads it, and says what is missing), or transformers keeps its
    weights quantized here (a GGUF kernel): then the file is read as it is."""
    file = Path(folder, gguf_file)
    if not file.is_file():
        return None
    stat = file.stat()
    source = {"file": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "transformers": transformers.__version__}
    entry = cache_root() / "gguf" / f"{file.stem}-{digest(source)}"

    def convert(tmp: Path) -> None:
        kwargs = {"gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        # Read without a GGUF matmul kernel (as on a CPU), transformers has dequantized every tensor
        # into a plain fp32 one and only its bookkeeping still says "gguf": dropped, the folder is a
        # plain fp32 model. With a kernel the weights stay in GGUF blocks: not converted, read as before.
        if not all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in model.state_dict().values()):
            raise _KeptQuantized()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, **kwargs).save_pretrained(tmp)
        write_json(tmp / SOURCE_FILE, source)

    try:
        build_once(entry, convert, what=f"converting {file.name}", complete=lambda p: (p / SOURCE_FILE).is_file())
    except _KeptQuantized:
        return None
    return entry


class _KeptQuantized(Exception):
    """transformers kept the GGUF blocks (a GGUF matmul kernel is installed): nothing to convert."""
