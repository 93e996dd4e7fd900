"""Download full COCO 2014 (123,287 images) with the Karpathy splits BLIP-2 uses: 113,287 train
(Karpathy's train + restval) / 5,000 val / 5,000 test, written in minblip2's captions.jsonl layout.

    python data/download_coco_karpathy.py --out /data/coco --dry-run   # what it would fetch
    python data/download_coco_karpathy.py --out /data/coco             # ~20 GB download, ~40 GB peak disk

Fetches (all resumable, md5-verified, sha256 recorded in <out>/manifest.json):
    COCO's annotations_trainval2014.zip   captions, sizes, licences (the official caption text)
    COCO's train2014.zip, val2014.zip     images, extracted to <out>/train2014/, <out>/val2014/
    LAVIS's coco_karpathy_{val,test}.json   which images are Karpathy val / test (the rest is train)
Writes <out>/captions.jsonl, whose `file` points into train2014/ or val2014/ (no renaming needed).
Split rule (as for coco-mini): an image in the Karpathy test (val) list is test (val); all others train.

Already have COCO 2014? Put or symlink train2014/ and val2014/ into <out> and pass --skip-images.
Have Karpathy's dataset_coco.json instead of the LAVIS files? Pass --karpathy-json PATH.
Then: `export MINBLIP2_DATA=<out>` or pass `--data.root=<out>`.
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import coco_common as cc  # noqa: E402

# md5s as published with these files (COCO's server ETag; LAVIS's dataset config).
IMAGE_ZIPS = {
    "train2014": {"url": "http://images.cocodataset.org/zips/train2014.zip",
                  "md5": "0da8c0bd3d6becc4dcb32757491aca88", "approx": "13.5 GB", "n": 82_783},
    "val2014": {"url": "http://images.cocodataset.org/zips/val2014.zip",
                "md5": "a3d79f5ed8d289b7a7554ce06a5782b3", "approx": "6.6 GB", "n": 40_504},
}
LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
# Only val and test are needed: every other COCO 2014 image is train (113,287 = 123,287 - 2 x 5,000), so
# LAVIS's large coco_karpathy_train.json (md5 aa31ac474cf6250ebb81d18348a07ed8) would add nothing.
KARPATHY_FILES = {
    "val": {"url": LAVIS + "coco_karpathy_val.json", "md5": "b273847456ef5580e33713b1f7de52a0"},
    "test": {"url": LAVIS + "coco_karpathy_test.json", "md5": "3ff34b0ef2db02d01c37399f6a2a6cd1"},
}
EXPECTED = {"train": 113_287, "val": 5_000, "test": 5_000}


def image_id_from_path(path: str) -> int:
    """'val2014/COCO_val2014_000000391895.jpg' -> 391895"""
    return int(Path(path).stem.rsplit("_", 1)[-1])


def split_ids_from_lavis(paths: dict) -> dict[str, set[int]]:
    """LAVIS's Karpathy files ({split: path}): lists of {"image": "val2014/COCO_val2014_<id>.jpg", ...}."""
    out = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            out[split] = {image_id_from_path(e["image"]) for e in json.load(f)}
    return out


def split_ids_from_karpathy(path) -> dict[str, set[int]]:
    """Karpathy's own dataset_coco.json: {"images": [{"cocoid", "split": train|restval|val|test}, ...]}."""
    with open(path, encoding="utf-8") as f:
        images = json.load(f)["images"]
    out = {"train": set(), "val": set(), "test": set()}
    for im in images:
        out["train" if im["split"] == "restval" else im["split"]].add(int(im["cocoid"]))
    return out


def assign_splits(coco: dict, split_ids: dict) -> dict[int, str]:
    """image_id -> split: test or val if listed there, train otherwise (train includes restval)."""
    return {i: "test" if i in split_ids["test"] else "val" if i in split_ids["val"] else "train" for i in coco}


def build_records(coco: dict, splits: dict) -> list[dict]:
    return [cc.make_record(i, splits[i], f"{coco[i]['coco_split']}/{coco[i]['file_name']}", coco[i])
            for i in sorted(coco)]


def extract(zip_path: Path, out: Path, name: str):
    """Unzip once; a marker file says the extraction finished (an interrupted one is redone)."""
    marker = out / name / ".extracted"
    if marker.exists():
        return
    cc.log(f"   extracting {zip_path.name} (takes a few minutes)")
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(out)  # members are train2014/COCO_train2014_....jpg
    marker.write_text("ok\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (needs ~40 GB free while extracting)")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    p.add_argument("--skip-images", action="store_true", help="train2014/ and val2014/ are already in --out")
    p.add_argument("--delete-zips", action="store_true", help="delete each image zip once extracted")
    p.add_argument("--karpathy-json", help="use Karpathy's dataset_coco.json for the splits instead of LAVIS's files")
    p.add_argument("--retries", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.out).expanduser().resolve()

    plan = [("annotations_trainval2014.zip", cc.ANNOTATIONS["url"], "253 MB")]
    if not args.karpathy_json:
        plan += [(f"karpathy/coco_karpathy_{s}.json", f["url"], "~2 MB") for s, f in KARPATHY_FILES.items()]
    if not args.skip_images:
        plan += [(f"{n}.zip", z["url"], z["approx"]) for n, z in IMAGE_ZIPS.items()]
    if args.dry_run:
        for rel, url, approx in plan:
            state = "present" if (out / rel).exists() else "to fetch"
            print(f"{url}\n    -> {out / rel}  ({approx}, {state})")
        print(f"then extract the image zips into {out}/train2014/, {out}/val2014/ and write {out}/captions.jsonl")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    manifest = cc.Manifest(out)
    cc.log("1/4 COCO 2014 caption annotations")
    ann_zip = out / "annotations_trainval2014.zip"
    if cc.fetch(cc.ANNOTATIONS["url"], ann_zip, manifest, md5=cc.ANNOTATIONS["md5"], size=cc.ANNOTATIONS["size"],
                retries=args.retries):
        manifest.save()
    coco = cc.read_coco_captions(ann_zip)

    cc.log("2/4 Karpathy splits")
    if args.karpathy_json:
        split_ids = split_ids_from_karpathy(args.karpathy_json)
    else:
        paths = {}
        for split, f in KARPATHY_FILES.items():
            paths[split] = out / "karpathy" / f"coco_karpathy_{split}.json"
            cc.fetch(f["url"], paths[split], manifest, md5=f["md5"], retries=args.retries)
        manifest.save()
        split_ids = split_ids_from_lavis(paths)

    cc.log("3/4 images")
    for name, z in IMAGE_ZIPS.items():
        if args.skip_images or (out / name / ".extracted").exists():
            continue
        zip_path = out / f"{name}.zip"
        cc.fetch(z["url"], zip_path, manifest, md5=z["md5"], retries=args.retries)
        manifest.save()
        extract(zip_path, out, name)
        if args.delete_zips:
            zip_path.unlink()
            manifest.forget(zip_path)
            manifest.save()
    records = build_records(coco, assign_splits(coco, split_ids))
    missing = [r for r in records[::1000] if not (out / r["file"]).exists()]  # spot-check 1 image in 1000
    if missing:
        raise SystemExit(f"images missing, e.g. {out / missing[0]['file']}: extract or link train2014/ and "
                         f"val2014/ into {out}")

    cc.log("4/4 captions.jsonl")
    cc.write_jsonl(records, out / "captions.jsonl")
    counts = {s: sum(r["split"] == s for r in records) for s in EXPECTED}
    cc.log(f"done: {counts} images, {sum(len(r['captions']) for r in records)} captions in {out}")
    if counts != EXPECTED:
        cc.log(f"warning: expected {EXPECTED} (Karpathy split of COCO 2014)")
    cc.log(f"use it with: export MINBLIP2_DATA={out}   (or --data.root={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
