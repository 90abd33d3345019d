"""Results files: per-item records as JSON lines, appended and flushed as batches end.

A run killed mid-write leaves an unterminated last line. Readers skip it with a warning naming the file and line;
a writer, which holds the file's lock, removes it (or ends it with a newline when it is a whole record) before it
appends, so that no record is ever glued onto a torn one. A malformed line anywhere else is an error naming the file
and line. Only one :class:`ResultWriter` at a time can hold a file: a second one, in this process or another, gets
:class:`ResultsFileBusyError` at once instead of interleaving its lines with the first one's.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from latent_relay.relay.item_result import ItemResult, RunKey, done_items

log = logging.getLogger("relay")


class ResultsFileError(ValueError):
    """A results file holds a line that is not a result record (the message names the file and line)."""


class ResultsFileBusyError(OSError):
    """Another writer holds the results file's lock."""


def _why(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def parse_record(line: bytes, path: Path | str, number: int) -> ItemResult:
    """The record on line ``number`` of ``path``; :class:`ResultsFileError` naming both if it is not one."""
    try:
        return ItemResult.model_validate(json.loads(line))
    except (ValueError, TypeError) as err:  # JSONDecodeError, UnicodeDecodeError and ValidationError are ValueErrors
        raise ResultsFileError(f"{path} line {number}: not a result record ({_why(err)})") from None


def parse_results(data: bytes, path: Path | str) -> list[ItemResult]:
    """The records in ``data`` (the bytes of results file ``path``): an unterminated last line that is not a whole
    record is skipped with a warning; any other malformed line raises :class:`ResultsFileError`."""
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: b"" when the file ends with one
    records = [parse_record(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    if tail.strip():
        try:
            records.append(parse_record(tail, path, len(lines) + 1))
        except ResultsFileError:
            log.warning(
                "%s line %d: incomplete record at the end of the file (a run stopped while writing it?): skipped",
                path,
                len(lines) + 1,
            )
    return records


def read_results(path: str | Path) -> list[ItemResult]:
    """Every record in results file ``path``, in file order (see :func:`parse_results`)."""
    return parse_results(Path(path).read_bytes(), path)


class ResultWriter:
    """Appends records to a JSONL file, one line each, flushed as written; ``path=None`` writes nothing.

    Takes the file's lock (``flock``, exclusive, non-blocking) when made, and holds it until :meth:`close`:
    :class:`ResultsFileBusyError` if another writer holds it. Repairs a torn last line left by a killed run."""

    _file = None

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+b")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise ResultsFileBusyError(
                f"{self.path} is being written by another run (it holds the file's lock); wait for it to end or "
                "write elsewhere"
            ) from None
        except BaseException:
            file.close()
            raise
        self._file = file
        self._repair_tail()

    def _repair_tail(self) -> None:
        """End the file on a newline: drop an incomplete last record, or terminate a whole one."""
        f = self._file
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        number = data.count(b"\n") + 1
        try:
            parse_record(data[start:], self.path, number)
        except ResultsFileError:
            os.ftruncate(f.fileno(), start)
            log.warning(
                "%s line %d: incomplete record at the end of the file (a run stopped while writing it?): removed "
                "(%d bytes)",
                self.path,
                number,
                size - start,
            )
            return
        f.write(b"\n")
        f.flush()

    def done(self, key: RunKey, *, retry_errors: bool = True) -> set[str]:
        """Ids of the items run ``key`` (:func:`~latent_relay.relay.item_result.run_key`) has finished in this
        file: their latest record has no error (any latest record when ``retry_errors`` is false)."""
        if self.path is None or not self.path.exists():
            return set()
        return done_items(read_results(self.path), key, retry_errors=retry_errors)

    def write(self, results: Iterable[ItemResult]) -> None:
        if self._file is None:
            return
        for r in results:
            self._file.write((r.model_dump_json() + "\n").encode("utf-8"))
            self._file.flush()

    def close(self) -> None:
        """Release the lock and close the file (writing afterwards writes nothing)."""
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
