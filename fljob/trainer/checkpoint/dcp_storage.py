"""DCP's readers and writers for a :class:`.store.CheckpointStore` location.

Local paths use DCP's file writer (fsync per file). Object stores use its fsspec writer with
the store's options, several upload threads, no fsync (a finished PUT is durable), and one
change: DCP's ``.metadata.tmp`` -> ``.metadata`` rename is a copy plus a delete on S3, and
s3fs deletes through the bulk DeleteObjects call, which current botocore signs with a CRC32
checksum in place of the Content-MD5 header that S3-compatible stores such as Swift 2.30
still require ("Missing required header for this request: Content-MD5"). Single-object
DeleteObject has no such requirement, so this writer deletes one object at a time.

Reading, DCP opens each file once and reads its tensors in order through one stream, which on
s3fs is one connection at a time. The object-store reader fetches each file whole instead, in
``PART_BYTES`` ranges requested concurrently (s3fs ``cat_ranges``), then hands DCP the bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributed.checkpoint import (
    FileSystemReader,
    FileSystemWriter,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

from fljob.trainer.checkpoint.store import CheckpointStore

UPLOAD_THREADS = 4
"""Files each rank writes in parallel to object storage (DCP splits a rank's state by thread)."""
PART_BYTES = 8 * 2**20
"""Range size of the concurrent GETs that read one checkpoint file."""


class _SingleDeleteFileSystem(FileSystem):
    """DCP's fsspec filesystem, deleting (and so renaming) one object per request."""

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fs.copy(os.fspath(path), os.fspath(new_path))
        self.fs.rm_file(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.rm_file(os.fspath(path))


class _WholeObjectReadFileSystem(FileSystem):
    """DCP's fsspec filesystem, reading each object whole through concurrent range GETs."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "rb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = os.fspath(path)
        size = self.fs.size(path)
        starts = list(range(0, size, PART_BYTES)) or [0]
        parts = self.fs.cat_ranges([path] * len(starts), starts,
                                   [min(start + PART_BYTES, size) for start in starts])
        yield io.BytesIO(b"".join(parts))


class ObjectStoreReader(FsspecReader):
    def __init__(self, checkpoint_id: str, store: CheckpointStore) -> None:
        super().__init__(checkpoint_id, **store.options)
        whole = _WholeObjectReadFileSystem()
        whole.fs = self.fs.fs
        self.fs = whole


class ObjectStoreWriter(FsspecWriter):
    def __init__(self, checkpoint_id: str, store: CheckpointStore) -> None:
        super().__init__(checkpoint_id, sync_files=False, thread_count=UPLOAD_THREADS,
                         **store.options)
        single = _SingleDeleteFileSystem()
        single.fs = self.fs.fs
        self.fs = single


def storage_writer(checkpoint_id: str, store: CheckpointStore) -> StorageWriter:
    if store.local:
        return FileSystemWriter(checkpoint_id, sync_files=True)
    return ObjectStoreWriter(checkpoint_id, store)


def storage_reader(checkpoint_id: str, store: CheckpointStore) -> StorageReader:
    if store.local:
        return FileSystemReader(checkpoint_id)
    return ObjectStoreReader(checkpoint_id, store)
