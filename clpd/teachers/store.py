"""Stored teacher outputs: each teacher's top-k logits at the answer positions of every training
example, computed once and read by every run that needs them (``distill.teacher_outputs=stored``).

A sweep asks the same teacher about the same problems again in every KD run and every seed; a
store asks it once. What is kept per answer position (a target the loss is taken on) is a
:class:`~clpd.losses.sparse.TopK` row: the teacher's k largest logits' vocabulary rows and values at
temperature 1, and the logsumexp of the other rows' logits (the tail bucket of the sparse
divergences: the tail's mass, exactly, at T = 1). Files (format 2, ``"format"`` in ``store.json``):

    offsets.npy  int64 [E + 1]  example e's rows are offsets[e]:offsets[e + 1], in position order
    rows.npy     uint8          k < width: the rows in :mod:`clpd.teachers.compact`'s bits, back to
                                back: ids Elias-Fano coded (sorted; the loss reads them as a set),
                                values as 10-bit mu-law gaps below the row's largest logit, the tail
                                in 20-bit fixed point: 99.25 bytes a row at k = 32 of 151,936
                                vocabulary rows where format 1 (int32 ids, fp32 logits) took 260
    logits.npy   fp32 [R, width]  k == width (``distill.top_k=null``): every logit, exact, in
                                vocabulary order (the ids are implied); the loss is the live one

The compact values lose what the loss barely sees: against fp32 the summed divergences move by
less than 1e-3 relative on 16-row micro-batches of a trained teacher, and by about 1e-4 on batches
of 256 rows (the measurement is in :mod:`clpd.teachers.compact`). A row comes back with its ids
ascending and its logits less the row's largest (a shift no divergence sees).

Rows are indexed by example and answer position, never by how a step lays out its micro-batches,
so one store serves padded and packed batches, any batch size and any curriculum order. The rows of
a micro-batch's examples are decoded from their own bytes of the memory map (a row is a fixed number
of bits), so a step reads no more of the store than its rows; the builder writes rows into the maps
as the teacher produces them (memory stays one batch, however large the store), and the parallel
jobs of a sweep share one copy of the file in the OS page cache; the ``.npy`` header holds each
array's dtype and shape, so a truncated file cannot pass for a whole one.

Keys and safety are those of the teacher cache (:mod:`clpd.cache`): a store lives in
``<teachers.cache_dir>/outputs/<teacher>-k<k>-<key>``, where the key covers the teacher's weights,
the encoded training data, k, ``trainer.max_length``, the vocabulary rows compared and the dtype the
teacher ran in; it is built into a temporary folder under a file lock and renamed when complete,
``store.json`` (the format, the key's fields and each file's sha256) written last. A store whose
files, key or format do not match is refused in one line before training.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clpd.cache import build_once
from clpd.config.model import ModelConfig
from clpd.data.batching import answer_mask, answer_token_count, collate
from clpd.errors import ClpdError
from clpd.files import digest, fingerprint, plain_json, write_json
from clpd.losses.sparse import TopK, top_k_outputs
from clpd.models.load import load_model
from clpd.progress import plain_lines, progress_bar
from clpd.teachers.compact import Layout, decode, encode, read_rows, write_rows
from clpd.training.checkpoint import sha256_file, weights_fingerprint

log = logging.getLogger("clpd.teachers.store")

FORMAT = 2  # 1 (no "format" in store.json): int32 ids and fp32 logits, 8k + 4 bytes a row
MARKER = "store.json"  # written last: a folder without it is not a store


@dataclass(frozen=True)
class StoreKey:
    """Everything a store's contents depend on; two runs that agree on it read the same store."""
    teacher: dict  # the architecture settings and the sha256 of the weight files
    data: str  # fingerprint of the encoded training examples (tokenizer, prompts, max_length, overlong)
    top_k: int
    width: int  # vocabulary rows compared (the tokenizer's size)
    max_length: int
    dtype: str  # the teacher's compute dtype (bf16 on CUDA rounds its logits)

    def digest(self) -> str:
        return digest(asdict(self))


def store_key(spec: ModelConfig, examples: Sequence[dict], *, top_k: Optional[int], width: int, max_length: int,
              dtype: torch.dtype) -> StoreKey:
    """The key of ``spec``'s store over ``examples`` (``top_k=None``: every compared row)."""
    if spec.path is None:
        raise ClpdError(f"teacher {spec.name} has no weights yet: build the ladder before its store")
    architecture = {k: v for k, v in plain_json(spec).items() if k not in ("name", "path")}
    return StoreKey({"architecture": architecture, "weights": weights_fingerprint(spec.path)}, fingerprint(examples),
                    width if top_k is None else top_k, width, max_length, str(dtype).removeprefix("torch."))


def store_dir(cache_dir: str | Path, name: str, key: StoreKey) -> Path:
    return Path(cache_dir) / "outputs" / f"{name}-k{key.top_k}-{key.digest()}"


def check_top_k(top_k: Optional[int], width: int) -> None:
    """k must name between 1 and every compared vocabulary row (before any teacher is built)."""
    if top_k is not None and not 1 <= top_k <= width:
        raise ClpdError(f"distill.top_k={top_k} is larger than the vocabulary ({width} rows compared); "
                        f"allowed: 1..{width}, or null for every row")


# --- building ------------------------------------------------------------------------------------

def _progress(console: Console) -> Progress:
    return progress_bar(console, TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def _open_maps(folder: Path, rows: int, key: StoreKey) -> Dict[str, np.ndarray]:
    """The store's arrays, created empty (zeros) at their full size: compact rows (k < width), or
    every row's logits in vocabulary order (k == width: exact, and no ids to keep)."""
    if key.top_k == key.width:
        return {"logits": np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float32,
                                                    shape=(rows, key.width))}
    size = Layout(key.top_k, key.width).stream_bytes(rows)
    return {"rows": np.lib.format.open_memmap(folder / "rows.npy", mode="w+", dtype=np.uint8, shape=(size,))}


def _write_rows(maps: Dict[str, np.ndarray], top: TopK, spans: Sequence[tuple], key: StoreKey) -> None:
    """A batch's rows (``top``, its examples' rows one after another) into the store at ``spans``:
    (first row in the store, rows) of each of its examples, in batch order."""
    indices, values, tail_lse = (t.cpu().numpy() for t in top)
    if "logits" in maps:
        dense = np.empty_like(values)
        np.put_along_axis(dense, indices, values, axis=1)
    else:
        layout = Layout(key.top_k, key.width)
        bits = encode(indices, values, tail_lse, layout)
    at = 0
    for first, n in spans:
        if "logits" in maps:
            maps["logits"][first:first + n] = dense[at:at + n]
        else:
            write_rows(maps["rows"], first, bits[at:at + n], layout)
        at += n


def write_store(folder: Path, model: torch.nn.Module, examples: Sequence[dict], key: StoreKey, *, pad_id: int,
                batch_size: int, device: torch.device, autocast_dtype: Optional[torch.dtype], console: Console,
                name: str) -> dict:
    """Run ``model`` over ``examples`` and write its store into ``folder`` (created here); returns
    the marker. Examples go through in length order (little padding), ``batch_size`` at a time,
    under ``inference_mode``; the output layer runs on answer positions only."""
    folder.mkdir(parents=True)
    counts = [answer_token_count([e]) for e in examples]  # each example's answer positions
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows, k = int(offsets[-1]), key.top_k
    np.save(folder / "offsets.npy", offsets)
    maps = _open_maps(folder, rows, key)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
    started = time.perf_counter()
    with _progress(console) as progress, torch.inference_mode():
        bar = progress.add_task(f"store {name} (k={k})", total=len(examples), rate="")
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            batch = {n: t.to(device) for n, t in collate([examples[i] for i in part], pad_id).items()}
            keep = answer_mask(batch.pop("targets"))
            with autocast:
                logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # [answer rows, V], row-major
            _write_rows(maps, top_k_outputs(logits, k, key.width), [(int(offsets[i]), counts[i]) for i in part], key)
            done = min(start + batch_size, len(order))
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress.update(bar, completed=done, rate=f"{rate:,.1f} examples/s")
            tenth = max(len(order) // 10, 1)  # about ten plain lines without a terminal
            if plain_lines(console) and (done == len(order) or done // tenth != (done - len(part)) // tenth):
                console.print(f"store {name} (k={k}) {done}/{len(order)}  {rate:,.1f} examples/s  "
                              f"{time.perf_counter() - started:.0f}s", soft_wrap=True)
    for array in maps.values():
        array.flush()
    files = ["offsets.npy", *(f"{a}.npy" for a in maps)]
    del maps
    marker = {"format": FORMAT, "key": asdict(key), "rows": rows, "examples": len(examples), "teacher": name,
              "build_s": round(time.perf_counter() - started, 2),
              "files": {f: sha256_file(folder / f) for f in files}}
    write_json(folder / MARKER, marker)  # last: the folder is a store from here on
    return marker


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build_store(spec: ModelConfig, examples: Sequence[dict], key: StoreKey, folder: Path, *, tokenizer,
                batch_size: int, device: torch.device, dtype: torch.dtype, autocast_dtype: Optional[torch.dtype],
                console: Console) -> bool:
    """Make ``folder`` hold ``spec``'s store (built once, under the cache entry's lock: runs that
    need it meanwhile wait and then read it); True when this call built it."""
    def build(tmp: Path) -> None:
        console.print(f"[bold]storing teacher {spec.name}'s top-{key.top_k} logits[/] for {len(examples)} examples "
                      f"into {folder}", soft_wrap=True)
        model = load_model(spec, tokenizer, dtype=dtype).to(device).eval()
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < key.width:
            raise ClpdError(f"teacher {spec.name} has {rows} output rows, fewer than the {key.width} vocabulary rows compared")
        marker = write_store(tmp, model, examples, key, pad_id=tokenizer.pad_token_id, batch_size=batch_size,
                             device=device, autocast_dtype=autocast_dtype, console=console, name=spec.name)
        del model
        gc.collect()
        console.print(f"stored teacher {spec.name}: {marker['rows']:,} answer positions, "
                      f"{store_bytes(tmp) / 2**20:,.1f} MiB, {marker['build_s']:.0f}s", soft_wrap=True)

    return build_once(folder, build, what=f"teacher {spec.name}'s stored outputs", complete=_complete)


def store_files(key: StoreKey) -> List[str]:
    """The files of a store of ``key`` besides its marker."""
    return ["offsets.npy", "logits.npy" if key.top_k == key.width else "rows.npy"]


def store_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.npy"))


# --- reading -------------------------------------------------------------------------------------

class TeacherStore:
    """One teacher's store, memory-mapped; ``rows(examples)`` gives a micro-batch's teacher outputs."""

    def __init__(self, folder: Path, key: StoreKey) -> None:
        self.folder = folder
        self.marker = verify_store(folder, key)
        self.width = key.width
        self.layout = None if key.top_k == key.width else Layout(key.top_k, key.width)
        self.data = np.load(folder / store_files(key)[1], mmap_mode="r")
        self.offsets = np.asarray(np.load(folder / "offsets.npy", mmap_mode="r"))

    def rows(self, examples: Sequence[int], device: torch.device) -> TopK:
        """The stored rows of ``examples`` (indices into the training set), concatenated in that
        order: the answer positions of a micro-batch in the order its loss reads them. Compact rows
        come back with each row's ids ascending, its largest logit 0 and the others and the tail
        relative to it (the divergences do not see the shift); a store of every row gives the
        logits as they were computed."""
        spans = [(int(self.offsets[e]), int(self.offsets[e + 1])) for e in examples] or [(0, 0)]
        if self.layout is None:
            values = np.concatenate([self.data[a:b] for a, b in spans])
            indices = np.broadcast_to(np.arange(self.width), values.shape)
            tail_lse = np.full(values.shape[0], -np.inf, dtype=np.float32)
        else:
            bits = np.concatenate([read_rows(self.data, a, b - a, self.layout) for a, b in spans])
            indices, values, tail_lse = decode(bits, self.layout)
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(device)  # noqa: E731
        return TopK(as_tensor(indices).long(), as_tensor(values), as_tensor(tail_lse))

    def logits(self, batch: Dict[str, torch.Tensor], examples: torch.Tensor, autocast) -> TopK:
        """A micro-batch's teacher outputs (the step's :class:`~clpd.training.step.Teacher`): the
        stored rows of its examples, on the device of its inputs; no model runs."""
        return self.rows(examples.tolist(), batch["input_ids"].device)


def verify_store(folder: Path, key: StoreKey) -> dict:
    """The marker of a store that is whole and was built for ``key``; one line of refusal otherwise."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise ClpdError(f"stored teacher outputs {folder} are incomplete or damaged ({MARKER}: {exc}); delete the "
                        f"folder and they are built again") from None
    if marker.get("format") != FORMAT:
        raise ClpdError(f"stored teacher outputs {folder} were written in store format "
                        f"{marker.get('format', 1)} and this clpd reads format {FORMAT}: delete the folder and the next run with "
                        f"distill.teacher_outputs=stored builds it again (or ahead of a sweep: clpd train "
                        f"teachers.build_only=true distill.teacher_outputs=stored)")
    expected = asdict(key)
    for field, value in expected.items():
        if marker.get("key", {}).get(field) != value:
            what = {"teacher": "another teacher (weights or architecture)", "data": "other training data",
                    "width": "another vocabulary"}.get(field, f"another {field}")
            raise ClpdError(f"stored teacher outputs {folder} were built for {what} ({field}: "
                            f"{_short(marker.get('key', {}).get(field))} here, {_short(value)} for this run); "
                            f"delete the folder or point teachers.cache_dir elsewhere")
    for name, digest in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise ClpdError(f"stored teacher outputs {folder} are damaged ({name} is "
                            f"{'missing' if not path.is_file() else 'not the file that was written'}); delete the "
                            f"folder and they are built again")
    if sorted(marker.get("files", {})) != sorted(store_files(key)):
        raise ClpdError(f"stored teacher outputs {folder}: {MARKER} lists {sorted(marker.get('files', {}))}, not the "
                        f"store's files; delete the folder and they are built again")
    return marker


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


class StorePool:
    """The stored counterpart of :class:`clpd.teachers.live.TeacherPool`: ``get(index)`` gives the
    store of ladder rung ``index`` (opened once; a store holds no device memory)."""

    def __init__(self, specs: Sequence[ModelConfig], stores: Dict[int, TeacherStore]) -> None:
        self.specs = list(specs)
        self.stores = stores
        self.active_index: Optional[int] = None

    def get(self, index: int) -> tuple[TeacherStore, bool]:
        switched = index != self.active_index
        self.active_index = index
        return self.stores[index], switched

    def name(self, index: Optional[int]) -> Optional[str]:
        return None if index is None else self.specs[index].name

    def release(self) -> None:
        self.active_index = None


def prepare_stores(specs: Sequence[ModelConfig], used: Sequence[int], examples: Sequence[dict], *, cache_dir: str,
                   top_k: Optional[int], max_length: int, tokenizer, batch_size: int, device: torch.device,
                   dtype: torch.dtype, autocast_dtype: Optional[torch.dtype], console: Console) -> Dict[int, TeacherStore]:
    """The stores of the rungs ``used`` (indices into ``specs``), built where missing, verified, open."""
    width = len(tokenizer)
    check_top_k(top_k, width)
    stores: Dict[int, TeacherStore] = {}
    for index in used:
        spec = specs[index]
        key = store_key(spec, examples, top_k=top_k, width=width, max_length=max_length, dtype=dtype)
        folder = store_dir(cache_dir, spec.name, key)
        if not build_store(spec, examples, key, folder, tokenizer=tokenizer, batch_size=batch_size, device=device,
                           dtype=dtype, autocast_dtype=autocast_dtype, console=console):
            log.info("teacher %s: reusing stored outputs %s", spec.name, folder)
        stores[index] = TeacherStore(folder, key)
    return stores


def describe(stores: Dict[int, TeacherStore], specs: Sequence[ModelConfig]) -> List[dict]:
    """For summary.json: each store's teacher, folder, k, rows and size."""
    return [{"teacher": specs[i].name, "folder": str(s.folder), "top_k": s.marker["key"]["top_k"],
             "rows": s.marker["rows"], "bytes": store_bytes(s.folder)} for i, s in sorted(stores.items())]
