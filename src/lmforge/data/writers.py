"""Writers: the final corpus shards, `corpus/shard_XXXXX.jsonl.zst` and optionally
`corpus/parquet/shard_XXXXX.parquet` (columns id, text, metadata as a JSON string).

Both are written in one streaming pass, each under a temporary name renamed when complete
(`lmforge.rundir.atomic_file`). Output is a pure function of the documents: the same
documents give byte-identical files.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable

import zstandard

from lmforge.data.document import Document
from lmforge.rundir import atomic_file

FORMATS = ("jsonl.zst", "parquet")
PARQUET_BATCH = 1000


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def output_paths(out_dir: Path, k: int, formats: Iterable[str]) -> list[Path]:
    paths = []
    if "jsonl.zst" in formats:
        paths.append(Path(out_dir) / f"{shard_name(k)}.jsonl.zst")
    if "parquet" in formats:
        paths.append(Path(out_dir) / "parquet" / f"{shard_name(k)}.parquet")
    return paths


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("text", pa.string()), ("metadata", pa.string())])


def write_output_shard(docs: Iterable[Document], out_dir: Path, k: int, formats: Iterable[str], zstd_level: int = 3) -> tuple[int, int]:
    """Write one output shard in every requested format, streaming. Returns (documents, characters)."""
    formats = list(formats)
    out_dir = Path(out_dir)
    n = chars = 0
    with contextlib.ExitStack() as stack:
        text_out = None
        if "jsonl.zst" in formats:
            raw = stack.enter_context(atomic_file(out_dir / f"{shard_name(k)}.jsonl.zst", "wb"))
            zw = stack.enter_context(zstandard.ZstdCompressor(level=zstd_level).stream_writer(raw, closefd=False))
            text_out = io.TextIOWrapper(zw, encoding="utf-8", write_through=False)
        pq_writer = None
        batch: list[Document] = []
        if "parquet" in formats:
            import pyarrow as pa
            import pyarrow.parquet as pq

            praw = stack.enter_context(atomic_file(out_dir / "parquet" / f"{shard_name(k)}.parquet", "wb"))
            pq_writer = pq.ParquetWriter(praw, _parquet_schema(), compression="zstd")

        def flush() -> None:
            if batch:
                cols = {
                    "id": [d.id for d in batch],
                    "text": [d.text for d in batch],
                    "metadata": [json.dumps(d.metadata, ensure_ascii=False) for d in batch],
                }
                pq_writer.write_table(pa.table(cols, schema=_parquet_schema()))
                batch.clear()

        for d in docs:
            n += 1
            chars += len(d.text)
            if text_out is not None:
                text_out.write(d.to_json())
                text_out.write("\n")
            if pq_writer is not None:
                batch.append(d)
                if len(batch) >= PARQUET_BATCH:
                    flush()
        if pq_writer is not None:
            flush()
            pq_writer.close()
        if text_out is not None:
            text_out.flush()
            text_out.detach()
    return n, chars


def iter_parquet_corpus(parquet_dir: Path) -> Iterable[Document]:
    """Read back `corpus/parquet/*.parquet` as Documents (shard order)."""
    import pyarrow.parquet as pq

    for p in sorted(Path(parquet_dir).glob("*.parquet")):
        for batch in pq.ParquetFile(p).iter_batches(batch_size=PARQUET_BATCH):
            for r in batch.to_pylist():
                yield Document(r["id"], r["text"], json.loads(r["metadata"]))
