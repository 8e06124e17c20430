"""``clpd <command> [hydra overrides]``: a small dispatcher in front of one Hydra app per command.

``@hydra.main`` parses ``sys.argv`` itself, so the dispatcher only takes the command word off the
command line and calls that command's own Hydra entry point; overrides, ``-m`` sweeps, ``--cfg``,
``--help``, ``hydra.run.dir=`` and shell completion all keep working. Errors in the user's input
(a bad override, a missing file) are printed as one line without a traceback; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import List

from clpd.environment import launched_by_torchrun
from clpd.errors import ClpdError

COMMANDS = {
    "train": ("clpd.commands.train", "distil (or fine-tune) a student; Hydra overrides, -m sweeps, +experiment=NAME"),
    "eval": ("clpd.commands.eval", "accuracy of a checkpoint or HF model: checkpoint=PATH benchmark=arith|gsm8k|svamp|jsonl"),
    "plan": ("clpd.commands.plan", "the train config's timeline (stages, teachers, pool sizes) and plan.png, no training"),
    "report": ("clpd.commands.report", "tables and plots over run dirs: clpd report PATH..."),
}

USAGE = "usage: clpd <command> [hydra overrides]   (clpd <command> --help shows that command's config)"


def _print_help() -> None:
    width = max(len(c) for c in COMMANDS)
    lines = [USAGE, "", "commands:"] + [f"  {c:<{width}}  {summary}" for c, (_, summary) in COMMANDS.items()]
    lines += ["", "shell completion: eval \"$(clpd train -sc install=bash)\""]
    print("\n".join(lines))


def _complete_command_word() -> bool:
    """Hydra's completion calls ``clpd -sc query=bash`` with COMP_LINE="clpd train ...". Complete
    the command word itself here; otherwise drop it from COMP_LINE and let the command answer.
    Returns True when the query was answered here."""
    words = os.environ.get("COMP_LINE", "").split(" ")
    if len(words) <= 2:  # still typing the command word
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
        return True
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
    sys.argv.insert(1, words[1])
    return False


def one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's errors as one line: the message and its cause, with the allowed values."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        line = f"{str(exc).strip().splitlines()[0]}; available: {', '.join(exc.options)}"
        if "hydra/launcher/" in line:  # joblib and submitit are plugins, in clpd's optional extra
            from clpd.launchers import SWEEP_EXTRA

            line += f"; the joblib, slurm and submitit_local launchers need {SWEEP_EXTRA}"
        return line
    parts = [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text = str(cause).strip().splitlines()
        key = next((ln.split(":", 1)[1].strip() for ln in text if ln.strip().startswith("full_key:")), None)
        parts.append(f"{key}: {text[0]}" if key else text[0])
        schema = getattr(cause, "object_type", None)  # an unknown key of a typed section: list the known ones
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(schema):
            parts[-1] += f"; allowed: {', '.join(f.name for f in dataclasses.fields(schema))}"
    return ": ".join(parts)


def with_config_path(argv: List[str], env: str | None) -> List[str]:
    """``CLPD_CONFIG_PATH=DIR[:DIR...]``: the user's config folders (a ``benchmark/NAME.yaml``, an
    ``experiment/NAME.yaml``) searched after clpd's own, as ``hydra.searchpath=[file://DIR,...]``
    would add them. A ``hydra.searchpath=`` on the command line is used instead."""
    folders = [os.path.abspath(os.path.expanduser(d)) for d in (env or "").split(os.pathsep) if d]
    if not folders or any(a.split("=", 1)[0].lstrip("+") == "hydra.searchpath" for a in argv):
        return argv
    return [*argv, f"hydra.searchpath=[{','.join(f'file://{d}' for d in folders)}]"]


def main(argv: List[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["-sc"] and any(a.startswith("query=") for a in argv):
        if _complete_command_word():
            return 0
        argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help()
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"clpd: error: unknown command '{command}'; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2

    # Let Hydra's exceptions reach us (instead of Hydra printing several lines) so that each user
    # error is reported as one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    entry = importlib.import_module(COMMANDS[command][0]).main
    try:
        # Under torchrun: join the other ranks, and agree on one run dir (torch is imported only then:
        # a single run composes and validates its config before it loads torch).
        if command == "train" and launched_by_torchrun():
            from clpd.training import distributed

            argv = [command, *distributed.init_from_env(argv[1:])]
        if command != "report":  # report is not a Hydra app
            argv = [command, *with_config_path(argv[1:], os.environ.get("CLPD_CONFIG_PATH"))]
        sys.argv = [sys.argv[0], *argv[1:]]
        entry()
    except ClpdError as exc:
        print(f"clpd {command}: error: {exc}", file=sys.stderr)
        return 1
    except (HydraException, OmegaConfBaseException) as exc:
        cause = exc.__cause__
        message = str(cause) if isinstance(cause, ClpdError) else one_line(exc)
        print(f"clpd {command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if "clpd.training.distributed" in sys.modules:
            sys.modules["clpd.training.distributed"].shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
