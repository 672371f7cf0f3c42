"""Exporting an audience package: CSV, or Parquet with typed columns."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from herald.audiences.store import INSERT_BATCH, Package, get, iter_rows
from herald.core.errors import WorkspaceError
from herald.core.workspace import Workspace


def export(ws: Workspace, package_id: str, to: Path) -> int:
    """Write a package to CSV or Parquet (by the file's suffix); return the row count."""
    package = get(ws, package_id)
    suffix = to.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise WorkspaceError(f"{to}: export to .csv or .parquet")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(to.name + ".part")
    count = 0
    if suffix == ".csv":
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=package.columns, extrasaction="ignore")
            writer.writeheader()
            for row in iter_rows(ws, package_id):
                writer.writerow(row.data)
                count += 1
    else:
        count = _export_parquet(ws, package, tmp)
    tmp.replace(to)  # never leave a half-written export under the real name
    return count


def _export_parquet(ws: Workspace, package: Package, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def arrow_type(value: Any) -> pa.DataType:
        if isinstance(value, bool):
            return pa.bool_()
        if isinstance(value, int):
            return pa.int64()
        if isinstance(value, float):
            return pa.float64()
        return pa.string()

    writer = None
    count = 0
    types: dict[str, pa.DataType] = {}
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        if not batch:
            return
        if writer is None:
            for col in package.columns:
                first = next((r[col] for r in batch if r.get(col) is not None), None)
                # a column that only mixes ints and floats is a float column
                kinds = {type(r[col]) for r in batch if r.get(col) is not None}
                types[col] = pa.float64() if kinds == {int, float} else arrow_type(first)
            schema = pa.schema([(c, types[c]) for c in package.columns])
            writer = pq.ParquetWriter(path, schema)
        table = pa.Table.from_pylist(
            [{c: _coerce(r.get(c), types[c]) for c in package.columns} for r in batch],
            schema=writer.schema)
        writer.write_table(table)
        batch.clear()

    for row in iter_rows(ws, package.id):
        batch.append(row.data)
        count += 1
        if len(batch) >= INSERT_BATCH:
            flush()
    flush()
    if writer is None:  # an empty package still gets a file with its columns
        import pyarrow as pa  # noqa: F811

        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in package.columns}),
                       path)
    else:
        writer.close()
    return count


def _coerce(value: Any, kind: Any) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    if kind == pa.string() and not isinstance(value, str):
        return str(value)
    if kind == pa.float64() and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == pa.int64() and not isinstance(value, int):
        return None if not isinstance(value, float) or value != int(value) else int(value)
    return value
