"""Where results go: output paths checked before any work, and ``generate``'s partial file.

A long run must neither find out at its end that it cannot write its result nor lose what it has
finished to a kill. So an output path is checked first (its format follows the suffix, it is not an
input, its folder exists or is created and takes a file), and ``erniegen generate`` appends every
finished batch to ``OUTPUT.partial`` (flushed per batch), writes ``OUTPUT`` from it at the end and
removes it; ``--resume`` continues a partial file, skipping the batches it holds.

``OUTPUT.partial`` is JSON lines: first the run's settings, then ``{"i": row, "prediction": text}``
per finished row (``i`` counts input rows from 0). The settings line makes a resume with another
model, input or decoding option an error instead of a file that mixes two runs.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from .data import DataError, Example, Fields

# suffix -> format; .json is JSON lines, as erniegen reads it
OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
PARTIAL_SUFFIX = ".partial"


def ensure_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` if needed and prove a file can be created in it.

    A real file is created because permission bits do not tell: root ignores them, and a read-only
    mount refuses root too.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what} {directory} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"{what} {directory} is not writable ({e.strerror or e})") from None


def check_output_path(output: str, inputs: Iterable[str], option: str = "--output") -> None:
    """``output`` is a file path that is none of ``inputs`` and whose folder takes files."""
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"{option} {output} is a folder; give a file name")
    for source in inputs:
        if os.path.realpath(output) == os.path.realpath(source) or (
                out.exists() and Path(source).exists() and os.path.samefile(output, source)):
            raise ValueError(f"{option} {output} is the input file {source}; writing it would destroy the input")
    ensure_writable_dir(out.parent, "output folder")


def output_format(output: str, option: str = "--output") -> str:
    """The format an output path's suffix asks for; an unknown suffix is refused, not written as JSONL."""
    suffix = Path(output).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"{option} {output}: unsupported suffix {suffix!r}; use .jsonl (or .json, JSON lines), "
                         ".csv or .tsv")
    return OUTPUT_FORMATS[suffix]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Name -> sha256 of each file (folders and non-files skipped).

    By content, not size and modification time: the same data or model copied to another disk
    (a new mtime) still resumes, and a rewrite that keeps the size does not.
    """
    return {path.name: file_digest(path) for path in map(Path, paths) if path.is_file()}


def input_digests(parts: Iterable[str | os.PathLike]) -> list[dict[str, str]]:
    """The digests of an input's parts in order, one entry each: two parts may share a file name
    (``a/dev.jsonl,b/dev.jsonl``), and reading them in another order is another input."""
    return [file_digests([part]) for part in parts]


class PartialPredictions:
    """``OUTPUT.partial`` of one ``generate`` run: read what a killed run finished, append batches."""

    def __init__(self, output: str, settings: dict[str, Any], num_rows: int):
        self.path = Path(output + PARTIAL_SUFFIX)
        self.settings = settings
        self.num_rows = num_rows
        self.done: dict[int, str] = {}      # input row -> prediction
        self._file: IO[str] | None = None
        self._keep_bytes = 0                # length of the complete lines already on disk

    def start(self, resume: bool) -> dict[int, str]:
        """Read an existing partial file; return the finished rows (empty for a fresh run).

        A fresh run refuses a partial file that holds finished rows (they would be lost); a resume
        needs one written with the same settings.
        """
        saved, done = self._read() if self.path.exists() else (None, {})
        if not resume:
            if done:
                raise ValueError(f"{self.path} holds {len(done)} rows finished by an interrupted run: pass --resume "
                                 "to continue it, or delete it to start over")
            return {}
        if saved is None:
            raise ValueError(f"--resume: no interrupted run to continue ({self.path} is missing or empty)")
        changed = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"--resume: {self.path} was written with other settings (saved, now): {changed}; "
                             "rerun with the same ones, or delete it to start over")
        if any(i >= self.num_rows for i in done):  # same settings, so only a hand-edited file gets here
            raise DataError(str(self.path), f"holds rows past the input's {self.num_rows}")
        self.done = done
        return dict(done)

    def _read(self) -> tuple[dict | None, dict[int, str]]:
        """(settings, finished rows); a line cut short by a kill ends the file, and is dropped later."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        lines = data[:end].decode("utf-8").split("\n")[:-1]
        if not lines:
            return None, {}
        settings = self._parse(lines[0], 1)
        if not isinstance(settings, dict) or "generate" not in settings:
            raise DataError(str(self.path), "is not an erniegen generate partial file (no settings line)", 1)
        done: dict[int, str] = {}
        for n, line in enumerate(lines[1:], start=2):
            row = self._parse(line, n)
            if not (isinstance(row, dict) and isinstance(row.get("i"), int) and row["i"] >= 0
                    and isinstance(row.get("prediction"), str)):
                raise DataError(str(self.path), 'expected {"i": input row, "prediction": text}', n)
            done[row["i"]] = row["prediction"]
        self._keep_bytes = end
        return settings["generate"], done

    def _parse(self, line: str, n: int) -> Any:
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(self.path), f"malformed JSON ({e.msg}); delete the file to start over", n) from None

    def open(self) -> None:
        """Open for appending: a fresh file starts with the settings line; a resumed one drops a cut line."""
        if self.done:
            with open(self.path, "r+b") as f:
                f.truncate(self._keep_bytes)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")
            self._file.write(json.dumps({"generate": self.settings}, ensure_ascii=False) + "\n")
            self._file.flush()

    def append(self, rows: Sequence[int], predictions: Sequence[str]) -> None:
        """One finished batch, in one write, flushed: a kill loses at most the batch being decoded."""
        assert self._file is not None, "open() first"
        self._file.write("".join(json.dumps({"i": i, "prediction": p}, ensure_ascii=False) + "\n"
                                 for i, p in zip(rows, predictions)))
        self._file.flush()
        self.done.update(zip(rows, predictions))

    def finish(self, output: str, fmt: str, examples: Sequence[Example],
               row_of: Callable[[Example, str], dict] | None = None) -> None:
        """Write ``output`` (every row, input order) atomically, then remove the partial file. Each row is
        ``row_of(example, output text)``: by default the input row with a ``prediction`` field."""
        if self._file is not None:
            self._file.close()
        missing = [i for i in range(len(examples)) if i not in self.done]
        if missing:
            raise RuntimeError(f"rows {missing[:5]} were never decoded")
        row_of = row_of or (lambda e, text: e.row | {"prediction": text})
        write_predictions(output, fmt, [row_of(e, self.done[i]) for i, e in enumerate(examples)])
        self.path.unlink()


def distilled_row(example: Example, text: str, target_field: Fields) -> dict:
    """A training row whose target is the teacher's output (sequence-level distillation); the reference moves
    to ``reference`` (null if the row had none; kept if already there: distilling a distilled file keeps the
    human reference). The target goes to the first of ``target_field``'s names the row has (else the first
    name), so the file keeps its layout. A blank output keeps the reference as the target: training refuses
    blank targets, and a row is never dropped."""
    row = dict(example.row)
    row.setdefault("reference", example.target)  # null for an unlabelled row, so a second pass cannot fill it
    if text.strip():
        names = (target_field,) if isinstance(target_field, str) else target_field
        row[next((n for n in names if n in row), names[0])] = text
    return row


def write_predictions(output: str, fmt: str, rows: Sequence[dict]) -> None:
    """Rows as JSON lines, CSV or TSV (columns: every field in first-seen order), written atomically."""
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            writer = csv.DictWriter(f, columns, restval="", delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
    os.replace(tmp, output)


def _cell(value: Any) -> str:
    """A CSV cell: text as is, null empty, anything else as JSON (numbers, lists, objects)."""
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value, ensure_ascii=False)
