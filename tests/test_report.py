"""``clpd report``: rows for every run (failed and unfinished too), groups over seeds, the paired
comparison to standard_kd, and the files it writes. Run dirs are written by hand, as train writes them."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from clpd.report.records import collect_runs
from clpd.report.stats import group_runs, paired_difference, t_quantile_975
from clpd.report.tables import write_report
from clpd.commands.report import main, run_report
from clpd.report.records import teacher_outputs

CLPD = str(Path(sys.executable).parent / "clpd")

# method -> seed -> (status, strict accuracy); flexible is strict + 0.05. standard_kd seed 2 has no
# completed clpd partner, so a comparison of unpaired means would give 0.65 - 0.40 = 0.25, not 0.2.
RUNS = {
    "standard_kd": {0: ("completed", 0.4), 1: ("completed", 0.5), 2: ("completed", 0.3)},
    "clpd": {0: ("completed", 0.5), 1: ("completed", 0.8), 2: ("failed", None), 3: ("running", None)},
}
TOKENS = {0: 1000, 1: 1100, 2: 1200, 3: 1300}
TRAIN_TIME = {0: 10.0, 1: 12.0, 2: 14.0, 3: 16.0}


def make_run(run_dir: Path, method: str, seed: int, status: str, acc: float | None, *,
             eval_in_summary: bool = True, hydra_yaml: bool = True, distill: dict | None = None) -> Path:
    """A train run dir like ``clpd train -m +experiment=arith method=... seed=...`` leaves it;
    ``distill``: overrides of ``distill.*`` keys (e.g. {"teacher_outputs": "stored", "top_k": 8})."""
    (run_dir / ".hydra").mkdir(parents=True)
    clpd = method == "clpd"
    config = {
        "student": {"name": "tiny", "path": None, "hidden_size": 32},
        "teachers": {"ladder": [{"name": "small", "path": None}, {"name": "large", "path": None}],
                     "schedule": "progressive" if clpd else "strongest",
                     "cache_dir": f"/scratch/{seed}/teachers",  # a location, not an experimental factor
                     "build": {"seed": "${seed}"}},  # follows the seed: must not split the groups
        "curriculum": {"name": "easy_to_hard" if clpd else "none", "pacing": "root" if clpd else "none"},
        "distill": {"name": "forward_kl", "loss": "forward_kl", **({"teacher_outputs": "live", "top_k": 32} if distill else {}),
                    **(distill or {})},
        "benchmark": {"name": "arith", "data_dir": None, "seed": 1234},
        "trainer": {"max_steps": 20, "lr": 0.005},
        "seed": seed,
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    distill_overrides = [f"distill.{k}={'null' if v is None else v}" for k, v in (distill or {}).items()]
    OmegaConf.save(OmegaConf.create(["+experiment=arith", f"method={method}", *distill_overrides, f"seed={seed}",
                                     f"hydra.sweep.dir=/scratch/{seed}"]), run_dir / ".hydra" / "overrides.yaml")
    if hydra_yaml:
        choices = {"experiment": "arith", "method": method, "distill": "forward_kl",
                   "curriculum": "easy_to_hard" if clpd else "none", "hydra/launcher": "basic"}
        OmegaConf.save(OmegaConf.create({"hydra": {"job": {"name": "train"}, "runtime": {"choices": choices}}}),
                       run_dir / ".hydra" / "hydra.yaml")
    (run_dir / "status.json").write_text(json.dumps({"status": status, **({"error": "boom"} if status == "failed" else {})}))
    lines = [{"step": 10, "loss": 2.0 - 0.1 * seed, "lr": 0.005, "tokens_seen": 500, "elapsed_s": 1.0, "pool": 10},
             {"event": "eval", "step": 10, "accuracy_strict": 0.2 if clpd else 0.1, "n": 200},  # clpd learns sooner
             {"event": "teacher_switch", "step": 10, "from": "small", "to": "large"},
             {"event": "skip_nonfinite", "step": 15, "loss": "nan", "examples": ["a", "b"]},
             {"step": 20, "loss": 1.0 - 0.1 * seed, "lr": 0.001, "tokens_seen": TOKENS[seed], "elapsed_s": 2.0, "pool": 20},
             {"event": "eval", "step": 20, "accuracy_strict": 0.3 + 0.1 * seed, "n": 200}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 30, "lo')
    if status == "completed":
        metrics = {"accuracy_strict": acc, "accuracy_flexible": acc + 0.05, "n": 100,
                   "by_difficulty": {"1": {"n": 50, "accuracy_strict": min(1.0, acc + 0.2), "accuracy_flexible": 1.0},
                                     "2": {"n": 50, "accuracy_strict": acc - 0.2, "accuracy_flexible": 0.5}}}
        summary = {"steps": 20, "final_loss": 1.0 - 0.1 * seed, "tokens_seen": TOKENS[seed], "answer_tokens_seen": 400,
                   "train_time_s": TRAIN_TIME[seed], "wall_time_s": TRAIN_TIME[seed] + 1, "student_parameters": 12345}
        if eval_in_summary:
            summary["eval"] = metrics
        else:  # the other place the metrics are written
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "train" / "2026-11-28" / "10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for method, seeds in RUNS.items():
        for seed, (status, acc) in seeds.items():
            make_run(sweep / str(job), method, seed, status, acc, eval_in_summary=(method, seed) != ("standard_kd", 1))
            job += 1
    # a teacher cache beside it has run files but no .hydra: not a run
    cache = root / "outputs" / "teachers" / "large-abc"
    cache.mkdir(parents=True)
    (cache / "status.json").write_text('{"status": "completed"}')
    return sweep


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sweep = make_sweep(root)
    out = root / "report"
    buffer = io.StringIO()
    runs = collect_runs([root])
    result = write_report(runs, out, Console(file=buffer, width=200))
    return {"root": root, "sweep": sweep, "out": out, "runs": runs, "result": result, "console": buffer.getvalue()}


def _csv_rows(out: Path) -> list:
    with (out / "report.csv").open() as f:
        return list(csv.DictReader(f))


def _group(reported, method: str) -> dict:
    (g,) = [g for g in reported["result"]["groups"] if g["params"]["method"] == method]
    return g


def test_every_run_is_a_csv_row_failed_and_unfinished_included(reported):
    rows = _csv_rows(reported["out"])
    assert len(rows) == 7
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by[("clpd", "2")]["status"] == "failed" and by[("clpd", "2")]["error"] == "boom"
    assert by[("clpd", "3")]["status"] == "unfinished" and by[("clpd", "3")]["accuracy_strict"] == ""
    assert float(by[("clpd", "1")]["accuracy_strict"]) == 0.8
    assert float(by[("standard_kd", "2")]["tokens_seen"]) == 1200
    assert float(by[("standard_kd", "0")]["accuracy_strict_steps_1"]) == pytest.approx(0.6)


def test_the_failed_run_is_listed_with_its_error_in_report_md(reported):
    md = (reported["out"] / "report.md").read_text()
    (line,) = [ln for ln in md.splitlines() if "| failed |" in ln]
    assert "| clpd | 2 |" in line and line.rstrip().endswith("| boom |")
    assert sum("| unfinished |" in ln for ln in md.splitlines()) == 1
    assert "## Groups" in md and "## Runs" in md and "report.png" in md


def test_group_statistics_are_mean_and_sample_std_over_the_completed_seeds(reported):
    kd, clpd = _group(reported, "standard_kd"), _group(reported, "clpd")
    assert kd["accuracy_strict"]["mean"] == pytest.approx(0.4) and kd["accuracy_strict"]["std"] == pytest.approx(0.1)
    assert kd["accuracy_flexible"]["mean"] == pytest.approx(0.45)
    assert kd["tokens_seen"]["mean"] == pytest.approx(1100) and kd["tokens_seen"]["std"] == pytest.approx(100)
    assert kd["train_time_s"]["mean"] == pytest.approx(12) and kd["train_time_s"]["std"] == pytest.approx(2)
    assert clpd["accuracy_strict"]["mean"] == pytest.approx(0.65)
    assert clpd["accuracy_strict"]["std"] == pytest.approx(math.sqrt(0.045))  # (0.5, 0.8): sd = 0.3/sqrt(2)
    assert (kd["completed"], kd["failed"], kd["unfinished"]) == (3, 0, 0)
    assert (clpd["completed"], clpd["failed"], clpd["unfinished"]) == (2, 1, 1)


def test_the_paired_difference_uses_only_the_seeds_both_completed(reported):
    d = _group(reported, "clpd")["vs_baseline"]
    assert d["baseline"] == "standard_kd" and d["n"] == 2
    half = 12.7062 * math.sqrt(0.02) / math.sqrt(2)  # differences (0.1, 0.3): sd 0.1414, t(1) = 12.706
    assert d["mean"] == pytest.approx(0.2)
    assert (d["low"], d["high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert half == pytest.approx(1.2706, abs=1e-4)
    assert _group(reported, "standard_kd")["vs_baseline"] is None


def test_the_learning_curve_mean_tells_a_faster_arm_from_one_that_only_ends_equal(reported):
    """Curve acc: the mean of a run's eval_every accuracies. clpd's curves start 0.1 higher (0.2 vs
    0.1 at step 10) and end where standard_kd's end, so each pair differs by 0.05."""
    kd, clpd = _group(reported, "standard_kd"), _group(reported, "clpd")
    assert kd["curve_accuracy"]["values"] == [pytest.approx(0.2), pytest.approx(0.25), pytest.approx(0.3)]
    d = clpd["vs_baseline_curve"]
    assert (d["n"], d["mean"], d["low"], d["high"]) == (2, pytest.approx(0.05), pytest.approx(0.05), pytest.approx(0.05))
    md = (reported["out"] / "report.md").read_text()
    assert "| curve acc | Δ curve vs standard_kd [95% CI] |" in md and "+0.050 [+0.050, +0.050] (2 pairs)" in md


def test_paired_difference_by_hand():
    mean, low, high, n = paired_difference({0: 0.5, 1: 0.8, 2: 0.9}, {0: 0.4, 1: 0.5, 5: 0.1})
    assert (mean, n) == (pytest.approx(0.2), 2) and high - mean == pytest.approx(1.2706, abs=1e-4)
    assert paired_difference({0: 0.5}, {0: 0.25, 1: 0.3}) == (0.25, None, None, 1)
    assert paired_difference({0: 0.5}, {1: 0.3}) == (None, None, None, 0)


def test_t_quantiles_match_the_t_table_and_approach_the_normal():
    assert [t_quantile_975(df) for df in (1, 2, 5, 10, 30)] == [12.7062, 4.3027, 2.5706, 2.2281, 2.0423]
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=1e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t_quantile_975(10 ** 6) == pytest.approx(1.96, abs=1e-3)


def test_only_method_is_varied_and_seed_is_a_run_column(reported):
    """The method presets change distill/curriculum/teachers keys, the seed changes
    teachers.build.seed, the sweep changes cache dirs: none of those splits the groups."""
    assert reported["result"]["varied"] == ["method"]
    header = next(csv.reader((reported["out"] / "report.csv").open()))
    assert header[:6] == ["run", "status", "error", "group", "method", "seed"]
    md = (reported["out"] / "report.md").read_text().splitlines()
    assert md[md.index("## Groups") + 2].startswith("| method | acc strict | acc flexible | Δ strict vs standard_kd")
    assert md[md.index("## Runs") + 2].startswith("| run | method | seed | status |")
    assert [g["label"] for g in reported["result"]["groups"]] == ["standard_kd", "clpd"]


def test_metrics_are_read_from_summary_eval_or_eval_metrics_json(reported):
    (run,) = [r for r in reported["runs"] if r["params"]["method"] == "standard_kd" and r["seed"] == 1]
    assert not (Path(run["run"]) / "summary.json").read_text().count('"eval"')
    assert run["metrics"]["accuracy_strict"] == 0.5 and run["by_difficulty"][2]["accuracy_strict"] == pytest.approx(0.3)
    assert run["curve"] == [(10, pytest.approx(1.9)), (20, pytest.approx(0.9))]  # events and half line skipped
    assert run["eval_curve"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.4))]  # trainer.eval_every's curve
    assert run["metrics"]["curve_accuracy"] == pytest.approx(0.25)  # its mean


def test_the_console_table_has_the_groups_and_the_comparison(reported):
    text = reported["console"]
    assert "standard_kd" in text and "clpd" in text
    assert "0.400 ± 0.100" in text and "0.650 ± 0.212" in text
    assert "+0.200 [-1.071, +1.471] (2 pairs)" in text
    assert "2 (+1 failed, +1 unfinished)" in text
    assert "boom" in text


def test_report_png_is_a_four_panel_png(reported):
    data = (reported["out"] / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    width, height = struct.unpack(">II", data[16:24])
    assert 1.2 * height < width < 2 * height  # 2 x 2 panels
    assert sorted(p.name for p in reported["out"].iterdir()) == ["report.csv", "report.md", "report.png"]


def test_the_seed_dots_have_their_legend_entry_when_the_first_group_has_no_completed_run(tmp_path, recwarn):
    make_run(tmp_path / "a", "clpd", 0, "running", None)  # the first group: nothing to draw
    make_run(tmp_path / "b", "standard_kd", 0, "completed", 0.4)
    make_run(tmp_path / "c", "standard_kd", 1, "completed", 0.5)
    write_report(collect_runs([tmp_path]), tmp_path / "out", Console(file=io.StringIO()))
    assert not [w for w in recwarn if "No artists with labels" in str(w.message)]
    assert (tmp_path / "out" / "report.png").exists()


def test_no_status_json_is_unfinished_a_broken_file_is_a_row_and_eval_runs_are_rows(tmp_path):
    run = make_run(tmp_path / "a", "clpd", 0, "completed", 0.5, hydra_yaml=False)
    (run / "status.json").unlink()
    ev = tmp_path / "outputs" / "eval" / "x"
    (ev / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"checkpoint": "ckpt/final", "benchmark": {"name": "arith"}, "seed": 0}),
                   ev / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["checkpoint=ckpt/final"]), ev / ".hydra" / "overrides.yaml")
    (ev / "status.json").write_text('{"status": "completed"}')
    (ev / "metrics.json").write_text(json.dumps({"accuracy_strict": 0.7, "accuracy_flexible": 0.75, "n": 16,
                                                 "checkpoint": "ckpt/final", "benchmark": "arith"}))
    broken = make_run(tmp_path / "b", "clpd", 1, "completed", 0.5, hydra_yaml=False)
    (broken / "summary.json").write_text('{"steps": ')
    runs = collect_runs([tmp_path])
    (bad,) = [r for r in runs if r["status"] == "unreadable"]  # a row that says why, not a crash
    assert bad["run"].endswith("b") and "summary.json is unreadable" in bad["error"]
    runs.remove(bad)
    by = {r["command"]: r for r in runs}
    assert by["train"]["status"] == "unfinished" and by["train"]["metrics"]["accuracy_strict"] is None
    assert by["eval"]["status"] == "completed" and by["eval"]["metrics"]["accuracy_strict"] == 0.7
    assert by["eval"]["params"]["checkpoint"] == "ckpt/final"
    assert len(group_runs(runs)) == 2


@pytest.mark.parametrize("file, text, error", [
    (".hydra/config.yaml", "a: [1, 2\nb: {", "ParserError: while parsing"),
    (".hydra/config.yaml", "5\n", "OSError: "),
    (".hydra/hydra.yaml", "hydra: {runtime: {choices: [a]}}\n", "hydra.runtime.choices is unreadable: a list"),
    ("status.json", "[1, 2]", "ValueError: status.json is unreadable: a list, not an object"),
    ("summary.json", '{"eval": "0.5"}', "ValueError: summary.json's eval is unreadable: a str, not an object"),
    ("summary.json", '{"teacher_outputs": "live"}', "summary.json's teacher_outputs is unreadable: a str"),
    ("metrics.jsonl", '{"step": null, "loss": 1.0}\n', "ValueError: metrics.jsonl is unreadable: step None is not a number"),
])
def test_a_corrupt_or_misshapen_file_makes_its_run_an_unreadable_row(tmp_path, file, text, error):
    make_run(tmp_path / "good", "clpd", 0, "completed", 0.5)
    bad = make_run(tmp_path / "bad", "clpd", 1, "completed", 0.5)
    (bad / file).write_text(text)
    runs = {Path(r["run"]).name: r for r in collect_runs([tmp_path])}
    assert runs["good"]["status"] == "completed"
    assert runs["bad"]["status"] == "unreadable" and error in runs["bad"]["error"], runs["bad"]["error"]
    assert runs["bad"]["metrics"]["accuracy_strict"] is None


def test_a_bug_while_reading_a_run_raises_instead_of_making_it_unreadable(tmp_path, monkeypatch):
    import clpd.report.records as records

    make_run(tmp_path / "a", "clpd", 0, "completed", 0.5)

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(records, "flatten", broken)
    with pytest.raises(TypeError, match="a bug"):
        collect_runs([tmp_path])


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "empty" / "outputs").mkdir(parents=True)
    for argv, message in (([str(tmp_path / "empty")], "no runs under"), ([], "give at least one PATH"),
                          ([str(tmp_path / "nope")], "does not exist"), (["--bogus", str(tmp_path)], "unrecognized")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("clpd report: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_the_clpd_command(tmp_path):
    make_sweep(tmp_path)
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([CLPD, "report", str(tmp_path / "multirun")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "standard_kd" in out.stdout and "acc strict" in out.stdout and "+0.200" in out.stdout
    assert (tmp_path / "multirun" / "report.png").is_file()
    missing = subprocess.run([CLPD, "report", "/does/not/exist"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == ["clpd report: error: /does/not/exist does not exist"]


def test_a_report_says_where_each_runs_teacher_logits_came_from():
    assert teacher_outputs({"teacher_outputs": {"source": "stored", "top_k": 8, "stores": []}}) == "stored k=8"
    assert teacher_outputs({"teacher_outputs": {"source": "live"}}) == "live"
    assert teacher_outputs({"teacher_outputs": {"source": None}}) is None  # SFT: no teacher
    assert teacher_outputs({}) is None  # a run from before clpd recorded it


# --baseline KEY=VALUE. scripts/stored_vs_live.sh's three sweeps: (method, arm) -> strict accuracy of
# seeds 0, 1, 2. The live runs keep the config's top_k (32); the stored ones set it (8, or null: every
# row). Stored minus live, per method: standard_kd k=8 -0.02 (differences -0.02, -0.03, -0.01), every
# row 0; clpd k=8 -0.05 (-0.05, -0.10, 0), every row +0.01. Paired across methods instead, clpd k=8
# minus standard_kd live would be +0.183.
STORED_VS_LIVE = {
    ("standard_kd", "live"): (0.40, 0.50, 0.30), ("standard_kd", "stored-k8"): (0.38, 0.47, 0.29),
    ("standard_kd", "stored-all"): (0.40, 0.50, 0.30),
    ("clpd", "live"): (0.50, 0.80, 0.60), ("clpd", "stored-k8"): (0.45, 0.70, 0.60), ("clpd", "stored-all"): (0.51, 0.81, 0.61),
}
ARMS = {"live": {"teacher_outputs": "live"}, "stored-k8": {"teacher_outputs": "stored", "top_k": 8},
        "stored-all": {"teacher_outputs": "stored", "top_k": None}}


@pytest.fixture(scope="module")
def stored_vs_live(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored_vs_live") / "runs"
    for (method, arm), accs in STORED_VS_LIVE.items():
        for seed, acc in enumerate(accs):
            make_run(root / f"seed{seed}" / method / arm, method, seed, "completed", acc, distill=ARMS[arm])
    return root


def _report(root: Path, out: Path, *argv: str) -> dict:
    result = run_report([str(root), "--out", str(out), *argv], Console(file=io.StringIO(), width=250))
    result["md"] = (out / "report.md").read_text()
    result["by_label"] = {g["label"]: g for g in result["groups"]}
    return result


def test_baseline_default_is_method_standard_kd_and_unchanged(reported, stored_vs_live, tmp_path):
    """No --baseline and --baseline method=standard_kd write the same files as before the option."""
    default = _report(reported["root"], tmp_path / "default")
    _report(reported["root"], tmp_path / "explicit", "--baseline", "method=standard_kd")
    for name in ("report.md", "report.csv"):
        assert (tmp_path / "default" / name).read_text() == (tmp_path / "explicit" / name).read_text()
    assert "| method | acc strict | acc flexible | Δ strict vs standard_kd [95% CI] |" in default["md"]
    assert "Δ is the paired difference of strict accuracy to `method=standard_kd` over the seeds both completed " \
           "(and, where both learned from teachers, the same build of the ladder" in default["md"]
    assert default["by_label"]["clpd"]["vs_baseline"]["mean"] == pytest.approx(0.2)
    # On the stored/live runs the default still compares methods: each clpd group to standard_kd's of the same arm.
    d = _report(stored_vs_live, tmp_path / "svl")["by_label"]["clpd / stored / 8"]["vs_baseline"]
    assert d["baseline"] == "standard_kd / stored / 8" and d["mean"] == pytest.approx((0.07 + 0.23 + 0.31) / 3)


def test_baseline_teacher_outputs_live_pairs_each_stored_group_with_the_live_group_of_its_method(stored_vs_live, tmp_path):
    result = _report(stored_vs_live, tmp_path / "out", "--baseline", "distill.teacher_outputs=live")
    assert result["varied"] == ["method", "distill.teacher_outputs", "distill.top_k"]
    by = result["by_label"]
    assert {label for label, g in by.items() if g["is_baseline"]} == {"standard_kd / live / 32", "clpd / live / 32"}
    expected = {"standard_kd / stored / 8": ("standard_kd / live / 32", -0.02),
                "standard_kd / stored / -": ("standard_kd / live / 32", 0.0),
                "clpd / stored / 8": ("clpd / live / 32", -0.05), "clpd / stored / -": ("clpd / live / 32", 0.01)}
    for label, (baseline, mean) in expected.items():
        d = by[label]["vs_baseline"]
        assert (d["baseline"], d["n"], d["mean"]) == (baseline, 3, pytest.approx(mean, abs=1e-12)), label
        assert by[label]["vs_baseline_curve"]["mean"] == pytest.approx(0.0)  # the fixture's curves follow the seed only
    d = by["clpd / stored / 8"]["vs_baseline"]  # differences (-0.05, -0.10, 0): sd 0.05, t(2) = 4.3027
    assert (d["low"], d["high"]) == (pytest.approx(-0.05 - 4.3027 * 0.05 / math.sqrt(3)),
                                     pytest.approx(-0.05 + 4.3027 * 0.05 / math.sqrt(3)))
    md = result["md"].splitlines()
    assert md[md.index("## Groups") + 2] == (
        "| method | distill.teacher_outputs | distill.top_k | acc strict | acc flexible "
        "| Δ strict vs distill.teacher_outputs=live [95% CI] | Δ detectable | curve acc | Δ curve vs distill.teacher_outputs=live [95% CI] "
        "| tokens seen | train time | n |")
    assert "| clpd | stored | 8 | 0.583 ± 0.126 | 0.633 ± 0.126 | -0.050 [-0.174, +0.074] (3 pairs) |" in result["md"]
    assert "clpd / stored / 8 vs clpd / live / 32" in result["md"]  # report.md says which group is whose baseline
    # VALUE is spelled as in an override: null for None. k=8 and live minus every row, per method.
    by = _report(stored_vs_live, tmp_path / "null", "--baseline", "distill.top_k=null")["by_label"]
    assert by["clpd / stored / 8"]["vs_baseline"]["baseline"] == "clpd / stored / -"
    assert by["clpd / stored / 8"]["vs_baseline"]["mean"] == pytest.approx(-0.06)
    assert by["standard_kd / live / 32"]["vs_baseline"]["baseline"] == "standard_kd / stored / -"


def test_a_bad_baseline_is_refused_in_one_line(stored_vs_live, capsys):
    keys = "method, distill.teacher_outputs, distill.top_k"
    for arg, message in (
            ("distill.teacher=live", (f"--baseline distill.teacher=live: no run has a parameter distill.teacher "
                                      f"(the keys the groups differ by: {keys})")),
            ("distill.teacher_outputs=cached", ("--baseline distill.teacher_outputs=cached: no run has "
                                                "distill.teacher_outputs=cached; the runs have distill.teacher_outputs=live, stored")),
            ("distill.top_k=None", "no run has distill.top_k=None; the runs have distill.top_k=32, 8, null"),
            ("seed=0", f"--baseline seed=0: seed (values 0, 1, 2) is not one of the keys the groups differ by: {keys}"),
            ("live", "--baseline live: give KEY=VALUE")):
        assert main([str(stored_vs_live), "--baseline", arg]) == 1
        err = capsys.readouterr().err
        assert err.startswith("clpd report: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (stored_vs_live / "report.md").exists()


# Records as docs/results/ keeps them: configs, status, metrics and summaries, and of the final
# checkpoint only its manifest (the teachers' sha256), no weights. Seeds 0-1 learned from one build
# of the ladder, seeds 2-3 from another; clpd seed 3 from a third, so it has no standard_kd partner.
BUILD_ACC = {  # (method, seed) -> (build, strict accuracy)
    ("standard_kd", 0): ("A", 0.40), ("standard_kd", 1): ("A", 0.50), ("standard_kd", 2): ("B", 0.30),
    ("standard_kd", 3): ("B", 0.60),
    ("clpd", 0): ("A", 0.45), ("clpd", 1): ("A", 0.60), ("clpd", 2): ("B", 0.32), ("clpd", 3): ("C", 0.90),
}


def committed_records(root: Path) -> Path:
    for (method, seed), (build, acc) in BUILD_ACC.items():
        run = make_run(root / f"seed{seed}" / method, method, seed, "completed", acc)
        manifest = {"ladder": [{"name": "small", "source": "/gone/small", "weights": {"model.safetensors": f"{build}1"}},
                               {"name": "large", "source": "/gone/large", "weights": {"model.safetensors": f"{build}2"}}]}
        (run / "checkpoints" / "final").mkdir(parents=True)
        (run / "checkpoints" / "final" / "manifest.json").write_text(json.dumps(manifest))
    make_run(root / "seed0" / "sft", "sft", 0, "completed", 0.35)  # no teachers: pairs with any build
    make_run(root / "seed2" / "sft", "sft", 2, "completed", 0.25)
    return root


def test_a_report_from_committed_records_pairs_arms_within_a_seed_and_a_teacher_build(tmp_path):
    result = _report(committed_records(tmp_path / "records"), tmp_path / "out")
    clpd, sft = result["by_label"]["clpd"]["vs_baseline"], result["by_label"]["sft"]["vs_baseline"]
    # clpd - standard_kd on seeds 0, 1 (build A) and 2 (build B): +0.05, +0.10, +0.02; seed 3 differs in build.
    diffs = [0.05, 0.10, 0.02]
    assert clpd["n"] == 3 and clpd["builds"] == 2
    assert clpd["mean"] == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert clpd["high"] - clpd["mean"] == pytest.approx(4.3027 * sd / math.sqrt(3))
    # 80% power at 5% (two-sided) with 3 pairs: (t_0.975 + t_0.80 at 2 df) * sd / sqrt(3).
    assert clpd["mde"] == pytest.approx((4.3027 + 1.0607) * sd / math.sqrt(3))
    assert sft["n"] == 2 and sft["mean"] == pytest.approx(((0.35 - 0.40) + (0.25 - 0.30)) / 2) and sft["builds"] == 2
    assert "+0.057 [-0.044, +0.157] (3 pairs, 2 teacher builds)" in result["md"]
    assert f"±{clpd['mde']:.3f}" in result["md"]


def test_t_quantiles_at_80_percent_match_scipy():
    from clpd.report.stats import t_quantile_80
    # scipy.stats.t.ppf(0.8, df) for df = 1, 5, 11, 30, 40, 100
    for df, value in ((1, 1.3764), (5, 0.9195), (11, 0.8755), (30, 0.8538), (40, 0.85070), (100, 0.84523)):
        assert t_quantile_80(df) == pytest.approx(value, abs=1e-4)


def test_runs_that_learned_from_different_rungs_pair_and_another_build_of_a_shared_rung_does_not():
    from clpd.report.stats import SeedBuild, paired_values

    from_xs, from_xl = SeedBuild(0, (("xs", "a1"),)), SeedBuild(0, (("xl", "b1"),))
    ladder, rebuilt = SeedBuild(0, (("xs", "a1"), ("xl", "b1"))), SeedBuild(0, (("xs", "a1"), ("xl", "b2")))
    assert len(paired_values({from_xs: 0.3}, {from_xl: 0.5})) == 1  # one rung each: nothing to disagree on
    assert len(paired_values({ladder: 0.3}, {from_xl: 0.5})) == 1
    assert paired_values({rebuilt: 0.3}, {from_xl: 0.5}) == []  # xl rebuilt: another block
    assert len(paired_values({0: 0.3}, {from_xl: 0.5})) == 1  # SFT (no teachers) pairs with any build
    assert len(paired_values({("clpd", 1): 0.3}, {("clpd", 1): 0.5, ("clpd", 2): 0.4})) == 1  # other keys match as they are


def test_a_second_baseline_adds_a_table_of_the_differences_against_it(reported, tmp_path):
    """--baseline method=standard_kd --baseline method=clpd: the groups table against standard_kd as
    without the second option, then standard_kd against clpd (0.4 - 0.5, 0.5 - 0.8 over the seeds both
    completed: mean -0.2, t(1) = 12.706 times sd 0.1414 / sqrt 2)."""
    one = _report(reported["root"], tmp_path / "one", "--baseline", "method=standard_kd")
    two = _report(reported["root"], tmp_path / "two", "--baseline", "method=standard_kd", "--baseline", "method=clpd")
    assert two["by_label"]["clpd"]["vs_baseline"] == one["by_label"]["clpd"]["vs_baseline"]
    assert two["md"].startswith(one["md"].split("## By seed")[0])
    d = {g["label"]: g for g in two["against"]["method=clpd"]}["standard_kd"]["vs_baseline"]
    half = t_quantile_975(1) * math.sqrt(0.02) / math.sqrt(2)
    assert (d["baseline"], d["n"]) == ("clpd", 2)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((-0.2, -0.2 - half, -0.2 + half))
    section = two["md"].split("## Against `method=clpd`")[1].split("## By seed")[0]
    assert "| method | Δ strict vs method=clpd [95% CI] | Δ detectable |" in section
    assert f"| standard_kd | -0.200 [{-0.2 - half:+.3f}, {-0.2 + half:+.3f}] (2 pairs) |" in section
    assert "| clpd | baseline |" in section


def test_every_baseline_given_is_checked(reported, capsys):
    assert main([str(reported["root"]), "--baseline", "method=standard_kd", "--baseline", "method=sft"]) == 1
    assert capsys.readouterr().err.strip() == ("clpd report: error: --baseline method=sft: no run has method=sft; "
                                               "the runs have method=clpd, standard_kd")


def test_report_md_lists_each_seeds_accuracy_group_by_group(reported, tmp_path):
    """The blocks the paired differences pair: a row per seed, "-" where a group has no completed run."""
    md = _report(reported["root"], tmp_path / "out")["md"]
    section = md.split("## By seed")[1].split("## Runs")[0].strip().splitlines()
    header = [c.strip() for c in section[2].strip("|").split("|")]
    assert header[0] == "seed" and sorted(header[1:]) == ["clpd", "standard_kd"]
    rows = {line.split("|")[1].strip(): dict(zip(header[1:], (c.strip() for c in line.strip("|").split("|")[1:])))
            for line in section[4:]}
    assert rows == {"0": {"standard_kd": "0.400", "clpd": "0.500"}, "1": {"standard_kd": "0.500", "clpd": "0.800"},
                    "2": {"standard_kd": "0.300", "clpd": "-"}}


def test_the_run_table_lists_seeds_in_numeric_order(tmp_path, monkeypatch):
    monkeypatch.setitem(TOKENS, 10, 2000)
    monkeypatch.setitem(TRAIN_TIME, 10, 20.0)
    for seed in (10, 2):  # as text, "10" sorts before "2"
        make_run(tmp_path / "runs" / f"seed{seed}", "standard_kd", seed, "completed", 0.5)
    md = _report(tmp_path / "runs", tmp_path / "out")["md"]
    runs = [line.split("|")[1].strip() for line in md.split("## Runs")[1].splitlines() if "/seed" in line]
    assert [run.rsplit("/", 1)[1] for run in runs] == ["seed2", "seed10"]


def test_a_varied_teacher_ladder_is_shown_by_its_rungs_names(tmp_path):
    for seed, ladder in ((0, ["small", "large"]), (1, ["large"])):
        run_dir = make_run(tmp_path / "runs" / f"seed{seed}", "standard_kd", seed, "completed", 0.5)
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        config.teachers.ladder = [{"name": name, "path": f"/models/{name}", "hidden_size": 64} for name in ladder]
        OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")
    result = _report(tmp_path / "runs", tmp_path / "out")
    assert result["varied"] == ["teachers.ladder"]
    groups = result["md"].split("## Groups")[1].split("##")[0]
    assert "| [small, large] |" in groups and "| [large] |" in groups and "/models/" not in groups
