"""An edgefl source plugin: follow a CSV file that a sensor logger appends rows to.

Each complete new line is one sample; with ``label_column: last`` its last value is the
label. A line that is not numbers is counted as ``bad_format``; samples the model cannot
take are counted by :meth:`PushSource.offer` under its reasons. When the queue is full the
source stops reading and resumes from the same line at the next poll, so the logger's
rows wait in the file instead of being dropped. A file that was rotated (new inode) or
truncated is read again from its start.

This is the worked example of ``docs/sources.md``: a :class:`DataSource` subclass (here
through :class:`PushSource`, which checks and queues samples) with an ``Options`` model,
built by the agent as ``CsvTailSource(name, options)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgefl.config import StrictModel
from edgefl.edge_agent.sources import PushSource, SampleError, SourceRecord

__all__ = ["CsvTailOptions", "CsvTailSource"]


class CsvTailOptions(StrictModel):
    """The ``options:`` of a ``csv-tail`` source."""

    path: Path = Field(description="The CSV file the logger appends to.")
    shape: list[int] | None = Field(None, description="Shape of one sample (the values, reshaped).")
    label_column: Literal["none", "last"] = Field("none", description="Where the label is.")
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = Field(False, description="The file's first line is a header.")
    from_start: bool = Field(
        False, description="Read the rows already in the file at start (else only new ones)."
    )
    stream: str = "samples"
    queue_size: int = Field(1000, ge=1)
    max_line_bytes: int = Field(65536, ge=16)


class CsvTailSource(PushSource):
    """Reads new CSV lines on every poll and hands them out as samples."""

    Options = CsvTailOptions

    def __init__(self, name: str, options: CsvTailOptions) -> None:
        super().__init__(
            name, stream=options.stream, queue_size=options.queue_size, shape=options.shape
        )
        self.options = options
        self._inode: int | None = None
        self._offset = 0
        self._skipping = False
        if not options.from_start:
            try:
                info = os.stat(options.path)
                self._inode, self._offset = info.st_ino, info.st_size
            except FileNotFoundError:
                pass

    def due(self, now: float) -> list[SourceRecord]:
        """The samples of the lines appended since the last poll."""
        self._read_new_lines()
        return super().due(now)

    def _read_new_lines(self) -> None:
        path = self.options.path
        room = self.queue_size - self.queued
        if room <= 0:
            return  # the rows wait in the file until the agent took what is queued
        try:
            with path.open("rb") as fh:
                info = os.fstat(fh.fileno())
                if info.st_ino != self._inode or info.st_size < self._offset:
                    # Rotated or truncated: the new file from its start.
                    self._inode, self._offset, self._skipping = info.st_ino, 0, False
                fh.seek(self._offset)
                data = fh.read(min(room, 1000) * self.options.max_line_bytes)
        except FileNotFoundError:
            return
        if self._skipping:  # the rest of a line too long to take
            end = data.find(b"\n")
            if end < 0:
                self._offset += len(data)
                return
            self._skipping = False
            self._offset += end + 1
            data = data[end + 1 :]
        *lines, incomplete = data.split(b"\n")
        for line in lines:
            first_line = self._offset == 0
            if not self._take_line(line, first_line):
                return  # the queue is full: read this line again next time
            self._offset += len(line) + 1
        if not lines and len(incomplete) > self.options.max_line_bytes:
            self.reject("too_large")
            self._skipping = True
            self._offset += len(incomplete)

    def _take_line(self, line: bytes, first_line: bool) -> bool:
        """Offer one line; ``False`` when it must wait (queue full)."""
        text = line.decode("utf-8", "replace").strip()
        if not text or (first_line and self.options.header):
            return True
        if len(line) > self.options.max_line_bytes:
            self.reject("too_large")
            return True
        try:
            values = [float(v) for v in text.split(self.options.delimiter)]
            label = None
            if self.options.label_column == "last":
                last = values.pop()
                if not last.is_integer():
                    raise ValueError(f"label {last} is not a class index")
                label = int(last)
        except (ValueError, IndexError):
            self.reject("bad_format")
            return True
        try:
            self.offer_one(values, label)
        except SampleError as exc:
            return exc.reason != "queue_full"
        return True
