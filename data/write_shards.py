"""Write a split of coco-mini / full COCO (or your own image folder) as parquet shards, for streamed training.

    python data/write_shards.py --out /data/coco-shards --split train --shards 64      # MINBLIP2_DATA / --root
    python data/write_shards.py --out shards/ --source my_folder --shards 8              # folder + metadata.jsonl
    minblip2-train --stage 1 --data.source=/data/coco-shards --data.streaming=True --stage1.cache_features=False

One row per image: image (the encoded file's bytes, a `datasets.Image` column), captions (a list of strings),
image_id. The reader (minblip2/streaming.py) expands each row into one sample per caption. Images are dealt
round-robin to the shards; each shard is written to a temporary name and renamed when complete, so a shard
that exists is whole (a truncated one is reported by name when training starts). Nothing is decoded here:
an unreadable image travels as it is and is reported (or skipped with --data.skip_bad_images=True) in training.
Use a number of shards divisible by the number of training processes (each process then reads whole shards)
and at least as large as processes x DataLoader workers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def image_rows(root=None, split="train", source=None):
    """(image_id, path, [captions]) per unique image of a COCO split, or of your own data (data.load_pairs)."""
    from minblip2.data import load_coco, load_pairs

    if source:
        pairs = load_pairs(source, split=split)
        caps = [[] for _ in range(len(pairs.images))]
        ids = [0] * len(pairs.images)
        for c, r, i in zip(pairs.captions, pairs.row_of_caption.tolist(), pairs.image_ids.tolist()):
            caps[r].append(c)
            ids[r] = i
        for r, image in enumerate(pairs.images):
            yield ids[r], image, caps[r]
        return
    recs = load_coco(root, split, per="image")
    for image_id, path, captions in zip(recs["image_id"], recs["image_path"], recs["captions"]):
        yield image_id, path, captions


def write_shards(rows, out: Path, num_shards: int, prefix: str = "train", row_group: int = 100) -> list[Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
                                  "image_id": datasets.Value("int64")})
    schema = features.arrow_schema
    out.mkdir(parents=True, exist_ok=True)
    names = [out / f"{prefix}-{k:05d}-of-{num_shards:05d}.parquet" for k in range(num_shards)]
    tmps = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in names]
    writers = [pq.ParquetWriter(t, schema) for t in tmps]
    pending = [[] for _ in range(num_shards)]

    def flush(k):
        if pending[k]:
            writers[k].write_table(pa.Table.from_pylist(pending[k], schema=schema))
            pending[k] = []

    n = 0
    try:
        for n, (image_id, image, captions) in enumerate(rows, 1):
            if isinstance(image, dict):  # already bytes (an image stored in a dataset)
                record = {"bytes": image.get("bytes"), "path": image.get("path")}
            else:
                record = {"bytes": Path(image).read_bytes(), "path": Path(image).name}
            k = (n - 1) % num_shards
            pending[k].append({"image": record, "captions": list(captions), "image_id": int(image_id)})
            if len(pending[k]) >= row_group:
                flush(k)
        for k in range(num_shards):
            flush(k)
    finally:
        for w in writers:
            w.close()
    if n < num_shards:
        for t in tmps:
            t.unlink(missing_ok=True)
        raise ValueError(f"{n} images cannot fill {num_shards} shards: use --shards {max(1, n)} or fewer")
    for t, p in zip(tmps, names):
        os.replace(t, p)  # atomic: a shard that exists is complete
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--root", default="", help="COCO folder (captions.jsonl); default $MINBLIP2_DATA / coco-mini")
    p.add_argument("--source", default="", help="instead of COCO: your own data (anything data.load_pairs reads)")
    p.add_argument("--split", default="train")
    p.add_argument("--shards", type=int, default=8)
    args = p.parse_args(argv)
    names = write_shards(image_rows(args.root or None, args.split, args.source or None), Path(args.out), args.shards,
                         prefix=args.split)
    size = sum(n.stat().st_size for n in names)
    print(f"wrote {len(names)} shards ({size / 2**20:.1f} MiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
