"""Regenerate data/coco_mini_ids.csv (image_id, split, coco_url) from a coco-mini captions.jsonl.

Only ids, Karpathy splits and COCO's URLs go into the CSV: no caption text, no pixels.

    python data/make_coco_mini_ids.py [--src /path/to/coco-mini/captions.jsonl]
"""
import argparse
import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(HERE.parent.parent / "shared" / "coco-mini" / "captions.jsonl"))
    p.add_argument("--out", default=str(HERE / "coco_mini_ids.csv"))
    args = p.parse_args(argv)
    with open(args.src, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["image_id"])
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image_id", "split", "coco_url"])
        for r in rows:
            w.writerow([r["image_id"], r["split"], r["coco_url"]])
    print(f"wrote {len(rows)} ids to {args.out}")


if __name__ == "__main__":
    main()
