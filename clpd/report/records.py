"""Reading run dirs: configs, overrides, status, metrics and loss curves."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clpd.errors import ClpdError

METRICS = ("accuracy_strict", "accuracy_flexible", "n", "tokens_seen", "train_time_s", "final_loss", "curve_accuracy")
EXTRA_METRICS = ("steps", "answer_tokens_seen", "wall_time_s", "student_parameters")


def _is_noise(key: str) -> bool:
    """Keys that differ between runs without making them different experiments: Hydra's own
    settings and filesystem locations (caches, data dirs). ``student.path`` (which student) and
    eval's ``checkpoint`` (which model was evaluated) are what a run is about, so they stay."""
    if key == "student.path":
        return False
    last = key.rsplit(".", 1)[-1]
    return key.split(".")[0].split("/")[0] == "hydra" or last.endswith("dir") or last == "path"


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested config as dotted keys; lists (a teacher ladder) as one compact JSON value."""
    if isinstance(node, dict) and (node or not prefix):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: _compact(node) if isinstance(node, (list, dict)) else node}


def _load_config(path: Path) -> dict:
    cfg = OmegaConf.load(path)
    try:  # interpolations such as ${seed} resolve; resolvers of Hydra's runtime (${now:...}) do not
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # what a failed interpolation raises, a resolver's own errors wrapped
        return OmegaConf.to_container(cfg, resolve=False)


def _parse_override(text: str) -> Optional[Tuple[str, str]]:
    """``method=clpd`` -> ("method", "clpd"); ``+experiment=arith`` -> ("experiment", "arith");
    ``~key`` -> ("key", "<deleted>")."""
    text = str(text).strip()
    if text.startswith("~"):
        key, _, value = text[1:].partition("=")
        return key, "<deleted>"
    key, sep, value = text.lstrip("+").partition("=")
    return (key, value) if sep else None


def _object(value: Any, where: str) -> Any:
    """``value`` as it is when it is an object (a dict with string keys) or empty (None, ``[]``, 0,
    which the caller's ``or {}`` reads as no object). A list, a string, a number or a key that is not
    a string where a run's file must hold an object raises ValueError: the run dir is unreadable."""
    if value and not isinstance(value, dict):
        raise ValueError(f"{where} is unreadable: a {type(value).__name__}, not an object")
    if value and not all(isinstance(key, str) for key in value):
        raise ValueError(f"{where} is unreadable: its keys are not all strings")
    return value


def _read_json(path: Path) -> Optional[Any]:
    """A run's JSON file (status, summary, metrics): None if it is missing; ValueError if it is not
    JSON or holds something other than an object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is unreadable: {exc}") from None
    return _object(value, path.name)


def _step(value: Any) -> int:
    """A metrics.jsonl line's step as an int; what int() refuses (null, a list, "x", NaN, infinity)
    raises ValueError: the run dir is unreadable."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"metrics.jsonl is unreadable: step {value!r} is not a number") from None


def _curves(path: Path) -> Tuple[List[Tuple[int, float]], List[Tuple[int, float]]]:
    """(step, loss) of the logging lines and (step, strict accuracy) of the eval events
    (``trainer.eval_every``); other events and a half-written last line are skipped."""
    loss: List[Tuple[int, float]] = []
    accuracy: List[Tuple[int, float]] = []
    if not path.is_file():
        return loss, accuracy
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if record.get("event") == "eval" and isinstance(record.get("accuracy_strict"), (int, float)):
            accuracy.append((_step(record["step"]), float(record["accuracy_strict"])))
        elif "event" not in record and isinstance(record.get("loss"), (int, float)):
            loss.append((_step(record["step"]), float(record["loss"])))
    return loss, accuracy


def curve_mean(points: List[Tuple[int, float]]) -> Optional[float]:
    """The mean test accuracy of a learning curve (``trainer.eval_every`` points, evenly spaced):
    the area under the curve over its length. Two runs that end equal but learn at different speeds
    differ here; None without a curve."""
    return sum(acc for _, acc in points) / len(points) if points else None


def _natural_key(path: Path) -> list:
    """Sweep job dirs 0, 1, ..., 10 in numeric order; dated run dirs in time order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(root: Path) -> List[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if (here / ".hydra" / "config.yaml").is_file() and (here / ".hydra" / "overrides.yaml").is_file():
            found.append(here)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "checkpoints"]
    return found


# What a broken run dir raises while it is read: a file that is missing or cannot be read (OSError;
# OmegaConf.load also raises it for a YAML file that holds a bare number), JSON or text that does not
# parse or holds the wrong kind of value (ValueError, JSONDecodeError and UnicodeDecodeError included;
# see _object and _step), YAML that does not parse (yaml.YAMLError), and a Hydra file whose keys or
# interpolations OmegaConf refuses (OmegaConfBaseException). Anything else is a bug and raises.
UNREADABLE = (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException)


def _read_params(run: Dict[str, Any], hydra_dir: Path) -> None:
    """The run's command and parameters: the composed config, Hydra's group choices for keys the
    config lacks, then the command-line overrides for keys the config lacks; minus the noise."""
    config = _load_config(hydra_dir / "config.yaml") or {}
    overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) or []
    choices, job_name = {}, None
    if (hydra_dir / "hydra.yaml").is_file():
        hydra_cfg = OmegaConf.load(hydra_dir / "hydra.yaml")
        selected = OmegaConf.select(hydra_cfg, "hydra.runtime.choices")  # absent or empty: no group choices
        choices = OmegaConf.to_container(selected) if selected else {}
        choices = _object(choices, "hydra.yaml's hydra.runtime.choices")
        job_name = OmegaConf.select(hydra_cfg, "hydra.job.name", default=None)
    run["command"] = job_name or ("eval" if "checkpoint" in config and "trainer" not in config else "train")

    flat = flatten(config)
    params = {"command": run["command"], **flat}
    for group, option in choices.items():  # Hydra's group choices, e.g. method: clpd (not in the config)
        if group not in params and not group.startswith("hydra/"):
            params[group] = option
            run["choice_keys"].append(group)
    for text in overrides:  # what the user typed wins over the defaults, for keys the config lacks
        parsed = _parse_override(text)
        if parsed is None:
            continue
        key, value = parsed
        run["override_keys"].append(key)
        if key not in flat:
            params[key] = value
    run["params"] = {k: v for k, v in params.items() if not _is_noise(k)}
    run["seed"] = params.get("seed")


def _read_status(run: Dict[str, Any], run_dir: Path) -> None:
    """status.json says ok (older runs: completed), failed or interrupted; a report says completed.
    Without it the run is unfinished."""
    status = _read_json(run_dir / "status.json") or {}
    if status.get("status") in ("ok", "completed", "failed", "interrupted"):
        run["status"] = "completed" if status["status"] in ("ok", "completed") else status["status"]
    run["error"] = status.get("error")


def _read_results(run: Dict[str, Any], run_dir: Path) -> None:
    """The metrics (summary.json's eval, else eval/metrics.json, else an eval run's metrics.json, and
    summary.json's own numbers), accuracy by difficulty, the teacher outputs and the curves."""
    summary = _read_json(run_dir / "summary.json") or {}
    metrics = _object(summary.get("eval"), "summary.json's eval") or _read_json(run_dir / "eval" / "metrics.json")
    if metrics is None and run["command"] == "eval":
        metrics = _read_json(run_dir / "metrics.json")
    metrics = metrics or {}
    for key in METRICS + EXTRA_METRICS:
        value = metrics.get(key, summary.get(key))
        run["metrics"][key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    run["by_difficulty"] = {int(k): v for k, v in (_object(metrics.get("by_difficulty"), "by_difficulty") or {}).items()
                            if str(k).lstrip("-").isdigit()}
    run["teacher_outputs"] = teacher_outputs(summary)
    run["build"] = teacher_build(_read_json(run_dir / "checkpoints" / "final" / "manifest.json") or {})
    run["curve"], run["eval_curve"] = _curves(run_dir / "metrics.jsonl")
    run["metrics"]["curve_accuracy"] = curve_mean(run["eval_curve"])


def read_run(run_dir: Path) -> dict:
    """One run dir as a row: its parameters (config, group choices, overrides), status and metrics.
    A broken run dir (see UNREADABLE) is a row with status "unreadable" and the error, not the end
    of the report; what was read before the error stays in the row."""
    run: Dict[str, Any] = {"run": str(run_dir), "command": None, "status": "unfinished", "error": None, "eval_curve": [],
                           "teacher_outputs": None, "build": None,
                           "params": {}, "override_keys": [], "choice_keys": [], "seed": None,
                           "metrics": {m: None for m in METRICS + EXTRA_METRICS}, "by_difficulty": {}, "curve": []}
    try:
        _read_params(run, run_dir / ".hydra")
        _read_status(run, run_dir)
        _read_results(run, run_dir)
    except UNREADABLE as exc:
        run["status"], run["error"] = "unreadable", f"{type(exc).__name__}: {exc}"
    if run["status"] != "completed":  # metrics of a run that did not finish are not its results
        run["metrics"] = {m: None for m in run["metrics"]}
        run["by_difficulty"] = {}
    return run


def teacher_build(manifest: dict) -> Optional[tuple]:
    """Which build of each teacher a run learned from: ((name, short hash of its weights' sha256), ...)
    from its final checkpoint's manifest, so that runs on two builds of one ladder config are told
    apart; None without teachers or without the manifest."""
    ladder = manifest.get("ladder") if isinstance(manifest, dict) else None
    weights = [(str(t.get("name")), hashlib.sha256(_compact(t.get("weights")).encode()).hexdigest()[:12])
               for t in ladder or [] if isinstance(t, dict)]
    return tuple(sorted(weights)) or None


def teacher_outputs(summary: dict) -> Optional[str]:
    """Where a finished run's teacher logits came from: "live", "stored k=N", or None (no teacher,
    or a run from before clpd recorded it)."""
    record = _object(summary.get("teacher_outputs"), "summary.json's teacher_outputs") or {}
    if record.get("source") == "stored":
        return f"stored k={record.get('top_k')}"
    return record.get("source")


def collect_runs(paths: Iterable[Any]) -> List[dict]:
    """Every run under ``paths`` (run dirs, sweep dirs, folders above them), in path order."""
    dirs: Dict[Path, None] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ClpdError(f"{path} does not exist")
        if not path.is_dir():
            raise ClpdError(f"{path} is not a directory (give a run dir, a sweep dir or a folder above them)")
        for d in find_run_dirs(path):
            dirs.setdefault(d.resolve(), None)
    return [read_run(d) for d in sorted(dirs, key=_natural_key)]

