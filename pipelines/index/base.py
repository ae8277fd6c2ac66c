"""What the steps of an index build share: its options, its summary line, and the index folder.

    >>> s = IndexSummary("out/idx", files=3, passages=12, embedded_now=12, index_type="flat", dim=384, model="m")
    >>> s.line()
    'indexed out/idx: 3 files read, 0 skipped; 12 passages: 12 embedded now, 0 reused, 0 removed, 0 failed; \
flat index, 384-d m; 0.0 s'
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.retrieval import dense
from dspy_ray.retrieval.manifest import ERRORS, join
from dspy_ray.retrieval.store import SHARD_ROWS
from dspy_ray.util.cli import EXIT_USAGE
from dspy_ray.util.fs import filesystem_for, is_uri, read_bytes
from pipelines.chunking import ChunkSettings
from pipelines.documents import Problem, RecordColumns
from stages.embed import EmbedStage


class IndexDirError(ValueError):
    """The index location cannot be used as asked."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


@dataclass(frozen=True)
class IndexOptions:
    corpus: str
    index: str
    resume: bool = False
    chunking: ChunkSettings = field(default_factory=ChunkSettings)
    columns: RecordColumns = RecordColumns()
    exclude: tuple[str, ...] = ()
    exact_below: int = dense.EXACT_BELOW
    ann: str = "ivf_flat"
    mode: str = "hybrid"
    k: int = 5
    shard_rows: int = SHARD_ROWS
    shard_above: int | None = None  # IVF built in parts by Ray tasks above this many vectors; None: dense.shard_above
    stage: EmbedStage = field(default_factory=EmbedStage)


@dataclass
class IndexSummary:
    index: str
    files: int = 0
    skipped: list[Problem] = field(default_factory=list)  # file-level problems
    records_skipped: int = 0
    ignored: dict[str, int] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)  # files of other kinds (not hidden or excluded), by name
    new_files: int = 0
    changed_files: int = 0
    unchanged_files: int = 0
    removed_files: int = 0
    passages: int = 0
    embedded_now: int = 0
    reused: int = 0
    removed: int = 0
    failed: int = 0
    index_type: str = ""
    dim: int = 0
    model: str = ""
    seconds: float = 0.0
    embed_seconds: float = 0.0  # the embedding stage: from its start to its last result
    first_result_s: float = 0.0  # from its start to its first result (actors starting up)
    first_result_rows: int = 0

    def line(self) -> str:
        shown = "; ".join(str(p) for p in self.skipped[:5])
        more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        skipped = f"{len(self.skipped)} skipped" + (f" ({shown}{more})" if self.skipped else "")
        changes = (f" ({self.new_files} new, {self.changed_files} changed, {self.unchanged_files} unchanged, "
                   f"{self.removed_files} removed)" if self.unchanged_files or self.removed_files else "")
        records = f", {self.records_skipped} records skipped" if self.records_skipped else ""
        failed = f", {self.failed} failed (in {ERRORS}; --resume retries them)" if self.failed else ", 0 failed"
        return (f"indexed {self.index}: {self.files} files read{changes}, {skipped}{records}; "
                f"{self.passages} passages: {self.embedded_now} embedded now, {self.reused} reused, "
                f"{self.removed} removed{failed}; {self.index_type} index, {self.dim}-d {self.model}; "
                f"{self.seconds:.1f} s")

    def ignored_line(self) -> str:
        items = ", ".join(f"{k} {v}" for k, v in sorted(self.ignored.items(), key=lambda kv: (-kv[1], kv[0])))
        if not items:
            return ""
        names = ", ".join(self.unsupported[:10]) + (f" and {len(self.unsupported) - 10} more"
                                                    if len(self.unsupported) > 10 else "")
        return f"ignored (not a document kind, hidden or excluded): {items}" + (
            f"; not a document kind: {names}" if names else "")


@dataclass(frozen=True)
class IndexDir:
    """The index folder: its location (absolute when local), its filesystem and the path inside it."""

    location: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def at(cls, index: str) -> IndexDir:
        location = index if is_uri(index) else os.path.abspath(index)
        return cls(location, *filesystem_for(location))

    def path(self, name: str) -> str:
        return join(self.root, name)

    def drop_folder(self, name: str) -> None:
        """Delete the folder ``name`` in the index folder with what it holds, if it is there."""
        path = self.path(name)
        try:
            if self.fs.get_file_info(path).type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass

    def read(self, name: str) -> bytes | None:
        """A file's bytes; None when it does not exist."""
        return read_bytes(self.fs, self.path(name))

    def read_table(self, name: str) -> pa.Table | None:
        """A parquet file of the folder; None when it is missing or unreadable."""
        try:
            return pq.read_table(self.path(name), filesystem=self.fs)
        except (FileNotFoundError, pa.ArrowInvalid, OSError):
            return None


def now() -> str:
    """The time, UTC, to the second: ``2025-06-01T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
