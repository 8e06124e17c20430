"""Atomic writes (a file or a folder appears whole or not at all) and plain data for hashing."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum

import pytest

from clpd.config.schema import to_object
from clpd.files import atomic_path, fingerprint, plain_json, write_json, write_jsonl, write_text
from clpd.teachers.ladder import teacher_key
from tests.conftest import compose_config
from tests.test_difficulty import PROBLEMS


def test_a_file_is_written_beside_its_target_and_renamed_onto_it(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("a.txt.") and tmp.suffix == ".tmp"
        assert not tmp.exists()  # the block creates it
        tmp.write_text("new")
        assert target.read_text() == "old"  # not replaced before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_two_writes_of_one_file_use_two_temporary_paths(tmp_path):
    with atomic_path(tmp_path / "a.txt") as first, atomic_path(tmp_path / "a.txt") as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert (tmp_path / "a.txt").read_text() == "1"  # the outer block ends last: the last rename wins
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("folder", [False, True])
def test_a_block_that_raises_leaves_the_old_target_and_no_temporary_file(tmp_path, folder):
    target = tmp_path / "out"
    if not folder:
        target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            if folder:
                (tmp / "sub").mkdir(parents=True)
                (tmp / "sub" / "weights").write_bytes(b"half")
            else:
                tmp.write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ([] if folder else ["out"])
    if not folder:
        assert target.read_text() == "old"


def test_a_whole_folder_is_renamed_into_place(tmp_path):
    target = tmp_path / "step-0000010"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "base").mkdir()
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["base", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000010"]


def test_json_files_are_indented_with_a_final_newline_and_refuse_nan(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1.5, None]})
    assert (tmp_path / "m.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1.5,\n    null\n  ]\n}\n'
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert json.loads((tmp_path / "m.json").read_text()) == {"b": 1, "a": [1.5, None]}  # the old file stays
    write_jsonl(tmp_path / "p.jsonl", [{"id": 1}, {"id": 2}])
    assert (tmp_path / "p.jsonl").read_text() == '{"id": 1}\n{"id": 2}\n'
    write_text(tmp_path / "r.md", "± Δ …")
    assert (tmp_path / "r.md").read_bytes() == "± Δ …".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "p.jsonl", "r.md"]


class Color(Enum):
    red = "r"


class Kind(str, Enum):
    a = "a"


@dataclasses.dataclass
class Inner:
    kind: Kind = Kind.a
    pair: tuple = (1, 2)


@dataclasses.dataclass
class Outer:
    z: int = 1
    color: Color = Color.red
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_plain_json_turns_dataclasses_enums_and_tuples_into_what_json_reads_back():
    plain = plain_json(Outer())
    assert plain == {"color": "r", "inner": {"kind": "a", "pair": [1, 2]}, "z": 1}
    assert list(plain) == ["color", "inner", "z"]  # keys sorted
    assert plain_json({"b": (Color.red,), "a": Kind.a}) == {"a": "a", "b": ["r"]}


# teacher_key(spec, tc) for the arith_tiny and arith_plateau ladders, since the key holds the
# trainer settings a teacher trains with and no evaluation setting: a change of these renames every
# cached teacher, so it retrains (arith_tiny: its ladder of 2026-12-05).
TEACHER_KEYS = {
    "teachers=arith_tiny": {"small": "e68c67d16ade", "medium": "652c3831c0ec", "large": "24b152daff66"},
    "+experiment=arith": {"small": "488dcf1c50b4", "medium": "f74907fc7721", "large": "e0723ea24876"},
}


@pytest.mark.parametrize("override", sorted(TEACHER_KEYS))
def test_teacher_cache_keys_do_not_change(override):
    tc = to_object(compose_config("train", [override]))
    assert {spec.name: teacher_key(spec, tc) for spec in tc.teachers.ladder} == TEACHER_KEYS[override]


def test_fingerprint_changes_with_the_data_and_not_between_versions():
    # Problems are fingerprinted field by field (their given difficulty included); the
    # caches of scores and stored outputs hold the fingerprint of encoded examples, checked below.
    assert fingerprint(PROBLEMS) == fingerprint(list(PROBLEMS)) == "20ababbda858dc87"
    assert fingerprint([{"input_ids": [1, 2], "labels": [-100, 2], "truncated": False}]) == "681a9dc6b3d5f4cd"
    assert fingerprint(PROBLEMS) != fingerprint(PROBLEMS[:3])
    assert fingerprint([{"input_ids": [1, 2], "labels": [-100, 2]}]) != fingerprint([{"input_ids": [1, 2], "labels": [1, 2]}])
