"""Download coco-mini (742 COCO images + their captions) from COCO's official servers.

    python data/download_coco_mini.py --out data/coco-mini     # ~250 MB annotations zip + ~100 MB images

Writes the layout minblip2 reads:
    <out>/images/<image_id as 12 digits>.jpg
    <out>/captions.jsonl        image_id, file, split, captions, width, height, license, license_url,
                                flickr_url, coco_url
    <out>/manifest.json         sha256 of every downloaded file, verified on re-run
    <out>/annotations_trainval2014.zip   COCO's caption annotations (delete it once done if you like)

Which images and their Karpathy split come from data/coco_mini_ids.csv; the captions, sizes and
licences from COCO's 2014 caption annotations. Re-running resumes: complete, verified files are skipped.
Then: `export MINBLIP2_DATA=<out>` or pass `--data.root=<out>`.
"""
from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import coco_common as cc  # noqa: E402


def read_ids(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"image_id": int(r["image_id"]), "split": r["split"], "coco_url": r["coco_url"]}
                for r in csv.DictReader(f)]


def check_image(path, width, height):
    """A downloaded JPEG must decode and have the size COCO's annotations give."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as e:  # noqa: BLE001 -- any decoder error means a bad file
        raise cc.ChecksumError(f"{path}: not a readable image ({e})") from e
    if width and height and size != (width, height):
        raise cc.ChecksumError(f"{path}: {size[0]}x{size[1]}, COCO says {width}x{height}")


def get_annotations(out: Path, manifest: cc.Manifest, url: str, retries: int) -> dict:
    official = url == cc.ANNOTATIONS["url"]
    dest = out / "annotations_trainval2014.zip"
    if cc.fetch(url, dest, manifest, md5=cc.ANNOTATIONS["md5"] if official else None,
                size=cc.ANNOTATIONS["size"] if official else None, retries=retries):
        cc.check_zip(dest)  # also catches a corrupt zip from a mirror without a known md5
        manifest.save()
    return cc.read_coco_captions(dest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "coco-mini"), help="output directory (default: data/coco-mini)")
    p.add_argument("--ids", default=str(HERE / "coco_mini_ids.csv"), help="image_id,split,coco_url CSV")
    p.add_argument("--annotations-url", default=cc.ANNOTATIONS["url"])
    p.add_argument("--workers", type=int, default=8, help="parallel image downloads")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    ids = read_ids(args.ids)

    if args.dry_run:
        print(f"would fetch {args.annotations_url} -> {out / 'annotations_trainval2014.zip'} (~253 MB)")
        print(f"would fetch {len(ids)} images -> {out / 'images'}/<id:012d>.jpg, e.g. {ids[0]['coco_url']}")
        print(f"would write {out / 'captions.jsonl'}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    manifest = cc.Manifest(out)
    cc.log(f"1/3 COCO 2014 caption annotations -> {out}")
    coco = get_annotations(out, manifest, args.annotations_url, args.retries)
    missing = [r["image_id"] for r in ids if r["image_id"] not in coco]
    if missing:
        raise SystemExit(f"{len(missing)} ids are not in COCO 2014 train/val annotations, e.g. {missing[:5]}")

    cc.log(f"2/3 {len(ids)} images -> {out / 'images'}")

    def one(r):
        info = coco[r["image_id"]]
        dest = out / "images" / f"{r['image_id']:012d}.jpg"
        url = info["coco_url"] or r["coco_url"]  # the 2014 URL from the annotations; the CSV's as fallback
        downloaded = cc.fetch(url, dest, manifest, retries=args.retries, progress=False)
        try:
            check_image(dest, info["width"], info["height"])
        except cc.ChecksumError:
            dest.unlink()  # a re-run downloads it again
            manifest.forget(dest)
            raise
        return downloaded

    failed, fetched = [], 0
    bar = cc.tqdm(total=len(ids), unit="img") if cc.tqdm else None
    with ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(one, r): r for r in ids}
        for fut in as_completed(futures):
            try:
                fetched += fut.result()
            except Exception as e:  # noqa: BLE001 -- report every failure, keep the rest
                failed.append(futures[fut]["image_id"])
                cc.log(f"  failed: {e}")
            if bar:
                bar.update()
    if bar:
        bar.close()
    manifest.save()
    cc.log(f"   {fetched} downloaded, {len(ids) - fetched - len(failed)} already complete, {len(failed)} failed")
    if failed:
        cc.log(f"re-run the same command to retry (failed ids: {sorted(failed)[:10]}...)")
        return 1

    cc.log("3/3 captions.jsonl")
    records = [cc.make_record(r["image_id"], r["split"], f"images/{r['image_id']:012d}.jpg", coco[r["image_id"]])
               for r in ids]
    for rec in records:
        rec["sha256"] = manifest.files[f"images/{rec['image_id']:012d}.jpg"]["sha256"]
    cc.write_jsonl(records, out / "captions.jsonl")
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
    cc.log(f"done: {counts} images, {sum(len(r['captions']) for r in records)} captions in {out}\n"
           f"use it with: export MINBLIP2_DATA={out}   (or --data.root={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
