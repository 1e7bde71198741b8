"""Catalog manifests, read one way wherever they come from: beside the files of
`POST /v1/ingest` (uploaded, inside an archive, in a folder under the import root) and as
the catalog `refrain ingest` and `refrain index build` take.

A manifest is CSV with the header `filename,track_id,title,artist,work_id`, or a JSON list
of objects with those keys. Only `filename` is required: the file a row describes (a name
as uploaded, an archive member, a path relative to the folder or to the CSV). `filename` is
the canonical name of that column; `path` is accepted for it, so a manifest written for
either way of ingesting reads the same in both, but one manifest may not have both.
Empty values are dropped: the file then gets the defaults of its name.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from refrain.service.archive import MAX_MANIFEST_BYTES
from refrain.service.errors import InvalidInput, TooLarge, listed

MANIFEST_FIELDS = ("filename", "track_id", "title", "artist", "work_id")
FILE_ALIAS = "path"  # accepted for `filename`
EXPECTED = (
    f"{','.join(MANIFEST_FIELDS)} (only filename is required; {FILE_ALIAS} is accepted "
    "for filename)"
)

Manifest = dict[str, dict[str, str]]  # filename -> {field: value}, the filename included


def _invalid(message: str) -> InvalidInput:
    return InvalidInput("invalid_manifest", message)


def parse_manifest(data: bytes, name: str = "manifest") -> Manifest:
    """Manifest bytes (CSV or JSON) -> {filename: {field: value}}, in the manifest's order,
    with empty values dropped and a `path` column read as `filename`; InvalidInput
    invalid_manifest naming `name` and the row for anything else."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _invalid(f"{name} is not UTF-8 text") from None
    is_json = name.lower().endswith(".json") or text.lstrip().startswith("[")
    rows = _json_rows(text, name) if is_json else _csv_rows(text, name)
    out: Manifest = {}
    duplicates = []
    for n, row in enumerate(rows, 1):
        row = _canonical(row, name, n)
        unknown = sorted(set(row) - set(MANIFEST_FIELDS))
        if unknown:
            raise _invalid(
                f"{name} row {n} has unknown fields {unknown}; expected {','.join(MANIFEST_FIELDS)}"
            )
        values = {k: str(v).strip() for k, v in row.items() if v is not None and str(v).strip()}
        filename = values.get("filename")
        if not filename:
            raise _invalid(f"{name} row {n} has no filename")
        if filename in out:
            duplicates.append(filename)
        out[filename] = values
    if duplicates:
        raise _invalid(f"{name} names these files more than once: {listed(duplicates)}")
    return out


def _canonical(row: dict, name: str, n: int) -> dict:
    """A row with its `path` as `filename`."""
    if FILE_ALIAS not in row:
        return row
    if "filename" in row:
        raise _invalid(
            f"{name} row {n} has both filename and {FILE_ALIAS}; give the file as filename"
        )
    return {("filename" if k == FILE_ALIAS else k): v for k, v in row.items()}


def _csv_rows(text: str, name: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    header = [f.strip() for f in reader.fieldnames or []]
    if not {"filename", FILE_ALIAS} & set(header):
        raise _invalid(
            f"{name} must be CSV with the header {EXPECTED} or a JSON list of objects with "
            "those keys"
        )
    reader.fieldnames = header
    try:
        rows = list(reader)
    except csv.Error as e:
        raise _invalid(f"{name} is not valid CSV: {e}") from None
    for n, row in enumerate(rows, 1):
        if None in row:
            raise _invalid(f"{name} row {n} has more values than the header has columns")
    return rows


def _json_rows(text: str, name: str) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid(f"{name} is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _invalid(f"{name} must be a JSON list of objects")
    for n, row in enumerate(rows, 1):
        if any(not isinstance(v, (str, int, float, type(None))) for v in row.values()):
            raise _invalid(f"{name} row {n}: values must be strings or null")
    return rows


def read_manifest_file(file: Path) -> bytes:
    """A manifest file's bytes, refused (TooLarge) over `MAX_MANIFEST_BYTES`."""
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise TooLarge(
            "manifest_too_large", f"{file.name} is larger than {MAX_MANIFEST_BYTES} bytes"
        )
    return file.read_bytes()
