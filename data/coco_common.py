"""What the two COCO download scripts share: a resumable, atomic, checksummed `download`, a sha256
manifest, and turning COCO's official caption annotations into minblip2's `captions.jsonl`.

Standard library + tqdm only, so the scripts run before anything else is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    tqdm = None

# COCO's own servers. md5 and size as published by COCO's server (its ETag is the md5) and used by
# torchvision, LAVIS, PaddleNLP and others; the sha256 we compute ourselves and record in the manifest.
ANNOTATIONS = {"url": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
               "md5": "0a379cfc70b0e71301e0f377548639bd", "size": 252_872_794}
CAPTION_FILES = {"train2014": "annotations/captions_train2014.json",  # members of the annotations zip
                 "val2014": "annotations/captions_val2014.json"}
USER_AGENT = "minblip2-downloader"
CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded file whose size or md5 is not the published one."""


def file_hash(path, algo: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def download(url: str, dest, *, md5: str | None = None, size: int | None = None, retries: int = 4,
             backoff: float = 2.0, timeout: float = 60, progress: bool = True, opener=None) -> Path:
    """Fetch `url` to `dest`, safely:

    - resumable: bytes go to `dest.part`; an interrupted download continues from there with an HTTP
      Range request (a server that ignores Range gets a fresh start);
    - atomic: `dest` appears (os.replace) only once complete and verified, so an existing `dest` is
      never half a file;
    - verified: the size must equal Content-Length (and `size`), the md5 must equal `md5`, when given;
    - retried: network errors and bad checksums are retried `retries` times with exponential backoff
      (HTTP 4xx other than 408/429 fail at once: retrying a 404 is pointless).
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    opener = opener or urllib.request.urlopen
    for attempt in range(retries + 1):
        try:
            _fetch_to_part(url, part, opener, timeout, progress and tqdm is not None, dest.name)
            got = part.stat().st_size
            if size is not None and got != size:
                raise ChecksumError(f"{url}: got {got} bytes, expected {size}")
            if md5 is not None and (h := file_hash(part, "md5")) != md5:
                raise ChecksumError(f"{url}: md5 {h}, expected {md5}")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 416, 429):
                raise
            err = e
            if e.code == 416:  # our .part is not a prefix the server can continue: start over
                part.unlink(missing_ok=True)
        except ChecksumError as e:
            err = e
            part.unlink(missing_ok=True)  # bad bytes: resuming would keep them
        except (urllib.error.URLError, OSError, ConnectionError) as e:  # incl. timeouts, IncompleteRead
            err = e
        if attempt < retries:
            wait = backoff * 2 ** attempt
            log(f"  {dest.name}: {err} -- retry {attempt + 1}/{retries} in {wait:.0f}s")
            time.sleep(wait)
    raise err


def _fetch_to_part(url, part: Path, opener, timeout, progress: bool, name: str):
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    with opener(req, timeout=timeout) as resp:
        if have and getattr(resp, "status", None) != 206:  # Range ignored: the body is the whole file
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, leave=False) if progress else None
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                if bar:
                    bar.update(len(chunk))
        if bar:
            bar.close()
    if total is not None and part.stat().st_size != total:  # the connection closed early
        raise OSError(f"incomplete download: {part.stat().st_size} of {total} bytes")


class Manifest:
    """`<out>/manifest.json`: {relative path: {"sha256", "size", "url"}} of every file we downloaded,
    so a re-run verifies what is on disk instead of trusting it."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "manifest.json"
        self.files = json.loads(self.path.read_text())["files"] if self.path.exists() else {}

    def _key(self, path) -> str:
        return Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()

    def record(self, path, url: str):
        self.files[self._key(path)] = {"sha256": file_hash(path), "size": Path(path).stat().st_size, "url": url}

    def forget(self, path):
        self.files.pop(self._key(path), None)

    def check(self, path) -> bool | None:
        """True: on disk and matches; False: on disk but differs; None: absent or never recorded."""
        entry = self.files.get(self._key(path))
        if entry is None or not Path(path).exists():
            return None
        return Path(path).stat().st_size == entry["size"] and file_hash(path) == entry["sha256"]

    def save(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"files": self.files}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def fetch(url: str, dest, manifest: Manifest, *, md5: str | None = None, size: int | None = None,
          **kw) -> bool:
    """download() unless `dest` is already there and verified. Returns True if it downloaded.

    On disk and in the manifest with the same sha256 -> skip. On disk but changed -> re-download.
    On disk but not in the manifest (copied in by hand, or the manifest was lost) -> kept if its
    md5/size match the published ones (when known), then recorded."""
    dest = Path(dest)
    ok = manifest.check(dest)
    if ok:
        return False
    if ok is False:
        log(f"{dest}: sha256 differs from {manifest.path.name}; downloading it again")
        dest.unlink()
    elif dest.exists():
        if (size is None or dest.stat().st_size == size) and (md5 is None or file_hash(dest, "md5") == md5):
            manifest.record(dest, url)
            return False
        log(f"{dest}: does not match the published checksum; downloading it again")
        dest.unlink()
    download(url, dest, md5=md5, size=size, **kw)
    manifest.record(dest, url)
    return True


def check_zip(path):
    """Read every member of a zip and check its CRC: catches a truncated or corrupted archive."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise ChecksumError(f"{path} is not a valid zip ({e}); delete it and re-run") from e
    if bad is not None:
        raise ChecksumError(f"{path}: member {bad} is corrupt; delete the zip and re-run")


def read_coco_captions(annotations_zip) -> dict[int, dict]:
    """COCO 2014 caption annotations -> {image_id: {captions, width, height, license, license_url,
    flickr_url, coco_url, file_name, coco_split}}. Captions are in annotation-id order, whitespace-stripped."""
    images = {}
    with zipfile.ZipFile(annotations_zip) as z:
        for coco_split, member in CAPTION_FILES.items():
            with z.open(member) as f:
                ann = json.load(f)
            licenses = {lic["id"]: lic for lic in ann.get("licenses", [])}
            for im in ann["images"]:
                lic = licenses.get(im.get("license"), {})
                images[im["id"]] = {
                    "captions": [], "width": im.get("width"), "height": im.get("height"),
                    "license": lic.get("name"), "license_url": lic.get("url"),
                    "flickr_url": im.get("flickr_url"), "coco_url": im.get("coco_url"),
                    "file_name": im["file_name"], "coco_split": coco_split,
                }
            for a in sorted(ann["annotations"], key=lambda a: a["id"]):
                images[a["image_id"]]["captions"].append(a["caption"].strip())  # some end in " " or "\n"
    return images


def make_record(image_id: int, split: str, file: str, info: dict) -> dict:
    """One captions.jsonl line (the layout minblip2.data.load_coco reads)."""
    keep = ("width", "height", "license", "license_url", "flickr_url", "coco_url")
    return {"image_id": image_id, "file": file, "split": split, "captions": info["captions"],
            **{k: info.get(k) for k in keep}}


def write_jsonl(records, path):
    """Atomically write one JSON object per line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
