"""Checkpoint save/load MB/s to S3, against a plain boto3 multipart upload/download of the
same bytes, in the same run.

The server is the project's Swift S3 (tests/infra/s3.sh, see bench/s3_server.py). The
checkpoint is a training state of ``--mib`` MiB of float32 tensors shaped like a Llama's
weights and its two Adam moments. Alternating, ``--passes`` times:

* fljob save: what the trainer's checkpointer does for a synchronous save, through the same
  code: DCP's planner and fsspec writer (``fljob.trainer.checkpoint.dcp_storage``, 4 upload
  threads) to ``step-N/``, then the commit (listing, marker, ``latest``);
* fljob load: DCP load of that step into preallocated tensors, as a resume does (the
  object-store reader fetches each file whole in 8 MiB ranges requested concurrently);
* anchor: boto3's managed transfer (multipart, 8 MiB parts, 4 threads) uploads the same
  ``.distcp`` files from memory, then downloads them into memory.

MB/s counts the shard bytes (10^6 bytes per MB) over wall time; the ratio is fljob / anchor.
A local-folder save/load row (DCP's file writer, fsync on) shows the cost without a network.

    eval "$(tests/infra/s3.sh env)"   # optional: else a server is started on ports 18595-18599
    python bench/checkpoint_s3.py [--mib 512 --passes 3]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed.checkpoint as dcp
from boto3.s3.transfer import TransferConfig

from bench.common import RESULTS, header, table, write_results
from bench.s3_server import s3_server, swift_version
from fljob.spec.models import SecretRef, Storage
from fljob.storage import s3_client
from fljob.trainer.checkpoint.dcp_storage import (
    PART_BYTES,
    UPLOAD_THREADS,
    storage_reader,
    storage_writer,
)
from fljob.trainer.checkpoint.store import CheckpointStore, storage_options

BUCKET = "fljob-bench"
PART = 8 * 2**20


def training_state(mib: int) -> dict[str, dict[str, torch.Tensor]]:
    """Weights plus two optimizer moments, about ``mib`` MiB (at least one layer, 144 MiB):
    layers of 4d x d MLP and d x d attention matrices, d = 1024."""
    d = 1024
    per_layer = (4 * d * d * 2 + d * d * 4) * 4 * 3  # fp32 weights + exp_avg + exp_avg_sq
    layers = max(1, mib * 2**20 // per_layer)
    gen = torch.Generator().manual_seed(0)
    model = {}
    for i in range(layers):
        for name, shape in (("w_up", (4 * d, d)), ("w_down", (d, 4 * d)), ("wq", (d, d)),
                            ("wk", (d, d)), ("wv", (d, d)), ("wo", (d, d))):
            model[f"layers.{i}.{name}"] = torch.randn(shape, generator=gen)
    optimizer = {f"{k}.{m}": torch.randn(v.shape, generator=gen)
                 for k, v in model.items() for m in ("exp_avg", "exp_avg_sq")}
    return {"model": model, "optimizer": optimizer}


def empty_like(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {group: {k: torch.empty_like(v) for k, v in tensors.items()}
            for group, tensors in state.items()}


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def fljob_save(store: CheckpointStore, step: int, state) -> None:
    dcp.save(state, storage_writer=storage_writer(store.step_uri(step), store))
    store.commit(step, {"time": time.time()})


def fljob_load(store: CheckpointStore, step: int, target) -> None:
    dcp.load(target, storage_reader=storage_reader(store.step_uri(step), store))


def s3_options(uri: str) -> dict:
    """What the trainer passes to s3fs for a spec whose storage section references the
    exported test credentials."""
    storage = Storage(endpoint_url=os.environ["S3_ENDPOINT_URL"],
                      region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                      access_key_id=SecretRef(env="AWS_ACCESS_KEY_ID"),
                      secret_access_key=SecretRef(env="AWS_SECRET_ACCESS_KEY"))
    return storage_options(uri, storage, os.environ)


def shard_blobs(client, prefix: str) -> dict[str, bytes]:
    """The ``.distcp`` objects of one step, in memory (the anchor uploads the same bytes)."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]
    return {o["Key"].rsplit("/", 1)[1]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listing if o["Key"].endswith(".distcp")}


def anchor_upload(client, prefix: str, blobs: dict[str, bytes], config: TransferConfig) -> None:
    for name, data in blobs.items():
        client.upload_fileobj(io.BytesIO(data), BUCKET, f"{prefix}/{name}", Config=config)


def anchor_download(client, prefix: str, blobs: dict[str, bytes], config: TransferConfig) -> None:
    for name in blobs:
        client.download_fileobj(BUCKET, f"{prefix}/{name}", io.BytesIO(), Config=config)


def delete_prefix(client, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=o["Key"])


def mbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="checkpoint size (MiB of tensors)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "checkpoint_s3.md")
    args = parser.parse_args()

    state = training_state(args.mib)
    target = empty_like(state)
    tensor_bytes = sum(t.numel() * 4 for g in state.values() for t in g.values())
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART,
                            max_concurrency=UPLOAD_THREADS, use_threads=True)
    work = Path(tempfile.mkdtemp(prefix="fljob-bench-ckpt-"))
    with s3_server() as server:
        client = s3_client()
        if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=BUCKET)
        run = uuid.uuid4().hex[:8]
        uri = f"s3://{BUCKET}/{run}/ckpt"
        store = CheckpointStore(uri, s3_options(uri))
        local = CheckpointStore(str(work / "ckpt"))
        times: dict[str, list[float]] = {k: [] for k in (
            "fljob save", "fljob load", "anchor upload", "anchor download", "local save", "local load")}
        blobs: dict[str, bytes] = {}
        for p in range(args.passes):
            step, anchor_prefix = p + 1, f"{run}/anchor-{p + 1}"
            # Pass 0 saves first (its shards are the anchor's bytes); then the order alternates.
            for which in ("fljob", "anchor") if p % 2 == 0 else ("anchor", "fljob"):
                if which == "fljob":
                    times["fljob save"].append(timed(fljob_save, store, step, state))
                    times["fljob load"].append(timed(fljob_load, store, step, target))
                    assert all(torch.equal(target[g][k], v) for g in state for k, v in state[g].items())
                    blobs = blobs or shard_blobs(client, f"{run}/ckpt/step-{step}")
                    store.remove_step(step)
                else:
                    times["anchor upload"].append(
                        timed(anchor_upload, client, anchor_prefix, blobs, config))
                    times["anchor download"].append(
                        timed(anchor_download, client, anchor_prefix, blobs, config))
                    delete_prefix(client, anchor_prefix)
            times["local save"].append(timed(fljob_save, local, step, state))
            times["local load"].append(timed(fljob_load, local, step, target))
            local.remove_step(step)
            print(f"pass {p + 1}/{args.passes}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
        shard_bytes, files = sum(map(len, blobs.values())), len(blobs)
        delete_prefix(client, f"{run}/ckpt")
    shutil.rmtree(work, ignore_errors=True)

    rate = {k: mbps(shard_bytes, v) for k, v in times.items()}
    lines = header("Checkpoint save/load to S3 vs a plain boto3 multipart transfer", torch.device("cpu"))
    lines += [
        f"- S3 server: OpenStack Swift with the S3 API, {server}; {swift_version()}",
        (f"- other versions: s3fs {_version('s3fs')}, fsspec {_version('fsspec')}, boto3 "
         f"{_version('boto3')}, aiobotocore {_version('aiobotocore')}"),
        (f"- checkpoint: {tensor_bytes / 2**20:.0f} MiB of float32 tensors (weights + 2 Adam "
         f"moments) -> {files} .distcp objects, {shard_bytes / 1e6:.1f} MB; {args.passes} passes, "
         "median; fljob and anchor alternate which goes first"),
        (f"- fljob: DCP + fsspec writer, {UPLOAD_THREADS} upload threads, then the commit (marker, "
         f"latest); load through the object-store reader ({PART_BYTES >> 20} MiB ranges, "
         f"concurrent); anchor: boto3 upload_fileobj/download_fileobj, {PART >> 20} MiB parts, "
         f"{UPLOAD_THREADS} threads, the same objects one after another"),
        "",
    ]
    lines += table(
        ["transfer", "fljob MB/s", "anchor (boto3) MB/s", "fljob / anchor"],
        [["save vs upload", f"{rate['fljob save']:.0f}", f"{rate['anchor upload']:.0f}",
          f"{rate['fljob save'] / rate['anchor upload']:.2f}"],
         ["load vs download", f"{rate['fljob load']:.0f}", f"{rate['anchor download']:.0f}",
          f"{rate['fljob load'] / rate['anchor download']:.2f}"]])
    lines += [
        "",
        (f"Context, no network: the same save/load to a local folder (DCP file writer, fsync): "
         f"{rate['local save']:.0f} MB/s save, {rate['local load']:.0f} MB/s load."),
        "",
        "Seconds per pass:",
        "",
    ]
    lines += table(["pass", *times], [[p + 1, *(f"{v[p]:.2f}" for v in times.values())]
                                      for p in range(args.passes)])
    write_results(args.out, lines)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
