"""Shared caches under a file lock (clpd/cache.py), and which teachers a run builds (clpd/teachers/ladder.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from clpd.cache import build_lock, build_once, lock_path
from clpd.config.schema import to_object
from clpd.teachers.ladder import teachers_in_use
from clpd.commands.plan import timeline
from clpd.commands.run_train import run_train
from tests.conftest import REPO, TINY_OVERRIDES, clpd_trains_at_once
from tests.test_teachers import LADDER, ladder_cfg

QUIET = Console(quiet=True)

# A process that builds cache entry FOLDER with clpd.cache.build_once: the build notes its pid in
# builds.txt, says that it started, and takes SECONDS.
BUILDER = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    from clpd.cache import build_once
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder, seconds = Path(sys.argv[1]), float(sys.argv[2])

    def build(tmp):
        with open(folder.parent / "builds.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        tmp.mkdir()
        (tmp / "part").write_text("half")
        print("building", flush=True)
        time.sleep(seconds)
        (tmp / "done").write_text("yes")

    print("built" if build_once(folder, build, what="entry x") else "reused", flush=True)
""")


def builder(folder: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(folder), str(seconds)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_two_processes_on_one_entry_build_it_once_and_the_other_waits_saying_for_whom(tmp_path):
    folder = tmp_path / "cache" / "x-123"
    first = builder(folder, 2.0)
    wait_for(lambda: (tmp_path / "cache" / "builds.txt").exists())  # the first holds the lock now
    second = builder(folder, 2.0)
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert out1.split() == ["building", "built"] and out2.split() == ["reused"]
    assert (tmp_path / "cache" / "builds.txt").read_text().split() == [str(first.pid)]
    assert f"entry x: waiting for pid {first.pid} on " in err2 and str(folder) in err2
    assert sorted(p.name for p in folder.iterdir()) == ["done", "part"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".locks", "builds.txt", "x-123"]  # no .tmp left


def test_a_build_killed_half_way_leaves_nothing_that_looks_complete_and_the_next_one_builds_again(tmp_path):
    folder = tmp_path / "cache" / "x-123"
    killed = builder(folder, 60.0)
    wait_for(lambda: killed.stdout.readline().strip() == "building")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not folder.exists()
    [leftover] = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
    assert (leftover / "part").exists()  # what the killed build had written, under its temporary name

    with build_lock(folder, what="entry x", report_every_s=0.1):  # the dead holder's lock is free at once
        pass
    again = builder(folder, 0.0)
    out, err = again.communicate(timeout=60)
    assert out.split() == ["building", "built"], err
    assert "left by a build that did not finish" in err and not leftover.exists()
    assert (folder / "done").exists()


def test_a_build_that_fails_removes_its_folder_releases_the_lock_and_raises(tmp_path):
    folder = tmp_path / "x"

    def failing(tmp):
        tmp.mkdir()
        (tmp / "part").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(folder, failing, what="entry x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks"]
    assert build_once(folder, lambda tmp: tmp.mkdir(), what="entry x") is True
    assert build_once(folder, lambda tmp: pytest.fail("built twice"), what="entry x") is False
    assert lock_path(folder).exists()


def test_an_entry_an_older_clpd_left_half_built_in_place_is_rebuilt(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")  # a teacher build that stopped before checkpoints/final
    built = build_once(folder, lambda tmp: (tmp / "checkpoints" / "final").mkdir(parents=True), what="teacher x",
                       complete=lambda d: (d / "checkpoints" / "final").is_dir())
    assert built and sorted(p.name for p in folder.iterdir()) == ["checkpoints"]


# --- which teachers a run builds --------------------------------------------------------------------

@pytest.mark.parametrize("overrides, used", [
    (["method=standard_kd"], ["c"]),
    (["method=curriculum_only"], ["c"]),
    (["method=teacher_schedule_only"], ["a", "b", "c"]),
    (["method=clpd"], ["a", "b", "c"]),
    (["method=clpd", "curriculum.num_stages=2"], ["a", "b"]),  # two stages: the strongest is never reached
    (["method=sft", "distill=sft"], []),
    (["method=none", "teachers.schedule=weakest"], ["a"]),
    (["method=none", "teachers.schedule=fixed", "teachers.fixed=b"], ["b"]),
    (["method=standard_kd", "teachers.build_only=true"], ["a", "b", "c"]),
    (["method=curriculum_only", "curriculum.difficulty=teacher_loss", "curriculum.teacher=a"], ["a", "c"]),
    (["method=sft", "distill=sft", "curriculum=easy_to_hard", "curriculum.difficulty=teacher_loss", "curriculum.teacher=b"], ["b"]),
    (["method=sft", "distill=sft", "curriculum.difficulty=teacher_loss", "curriculum.teacher=b"], []),  # random order: never scored
])
def test_only_the_teachers_of_the_schedule_and_the_scorer_are_built(tmp_path, overrides, used):
    tc = to_object(ladder_cfg(tmp_path, *overrides))
    assert [tc.teachers.ladder[i].name for i in teachers_in_use(tc)] == used
    if tc.curriculum.difficulty.value != "teacher_loss":  # the plan's timeline uses no other teacher
        plan = timeline(tc, None if tc.curriculum.pacing.value == "none" else list(range(64)), 64)
        assert {plan["teachers"][s["teacher"]] for s in plan["steps"] if s["teacher"] is not None} <= set(used)


def test_standard_kd_builds_one_teacher_not_three_and_its_records_say_which(tmp_path):
    summary = run_train(ladder_cfg(tmp_path, "method=standard_kd", "trainer.max_steps=2"), tmp_path / "run", QUIET)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == ["c"]
    rows = json.loads((tmp_path / "run" / "teachers.json").read_text())
    assert [(r["name"], r["used"], r["path"] is not None) for r in rows] == [
        ("a", False, False), ("b", False, False), ("c", True, True)]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "final" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["ladder"]] == ["c"]
    assert summary["teacher_switches"][0]["to"] == "c"


@pytest.mark.slow
def test_two_runs_started_at_once_on_an_empty_cache_both_finish_and_train_each_teacher_once(tmp_path):
    cache = tmp_path / "cache"
    overrides = [*TINY_OVERRIDES, "method=clpd", "teachers.name=test", *LADDER, "teachers.build.max_steps=30",
                 "teachers.build.warmup_steps=1", "teachers.build.batch_size=4", "teachers.build.grad_accum=1",
                 "teachers.build.eval=false", "trainer.grad_accum=1", "trainer.eval_at_end=false",
                 f"teachers.cache_dir={cache}"]
    runs = clpd_trains_at_once(overrides, [tmp_path / "one", tmp_path / "two"], cwd=tmp_path)
    outputs = [out for _, out in runs]
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    both = "".join(outputs)
    for name in ("a", "b", "c"):
        assert both.count(f"training teacher {name} ") == 1, both[-4000:]
    assert "waiting for pid" in both  # the second run waited for (at least) the first teacher
    assert sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith(".")) == ["a", "b", "c"]
    for name in ("one", "two"):
        assert json.loads((tmp_path / name / "status.json").read_text())["status"] == "ok"
