"""Row access over the parquet files of the official training formats (``t2i_pretrain``, ``unified_edit``)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import pyarrow.parquet as pq

from .errors import DataConfigError


class ParquetRows:
    """Row access over a list of parquet files (one cached row group at a time)."""

    def __init__(self, files: Sequence[str], columns: Sequence[str]):
        self.files = list(files)
        self.columns = list(columns)
        self.index = []  # (file, row_group, row) per global row
        for fi, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
                meta = pf.metadata
            except Exception as e:
                raise DataConfigError(f"{path}: not a readable parquet file ({e})") from None
            names = set(pf.schema_arrow.names)
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DataConfigError(f"{path}: missing column(s) {missing} (found {sorted(names)})")
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.index += [(fi, g, r) for r in range(n)]
        self._cache_key = None
        self._cache = None

    def __len__(self) -> int:
        return len(self.index)

    def row(self, i: int) -> dict[str, Any]:
        fi, g, r = self.index[i]
        if self._cache_key != (fi, g):
            self._cache = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=self.columns).to_pylist()
            self._cache_key = (fi, g)
        return self._cache[r]


def parquet_files(data_dir: str) -> list[str]:
    """The ``*.parquet`` files of ``data_dir``, sorted (DataConfigError if there are none)."""
    if not os.path.isdir(data_dir):
        raise DataConfigError(f"data folder not found: {data_dir}")
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
    if not files:
        raise DataConfigError(f"{data_dir}: no .parquet files")
    return files
