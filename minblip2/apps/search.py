"""Search a folder of images by text with a trained run (its stage-1 Q-Former).

    minblip2-search runs/coco-mini --images ~/photos "a dog on a couch"
    minblip2-search runs/coco-mini --images ~/photos "a dog on a couch" "a red bus" -k 10 --rerank 20
(`minblip2-search` is `python -m minblip2.apps.search`.)

Prints, for each query, the k best images with their scores: ITC (cosine similarity, max over the image's
queries), or with --rerank N the ITC top N re-scored by the ITM head (score = P(match) + ITC). The folder's image
embeddings are cached (default: <run_dir>/search_cache/), keyed by each file's path, size and modification time,
so a second search encodes nothing and a changed folder re-encodes only the new or changed files; a new
checkpoint starts the cache afresh. Files that are not images are skipped and counted. Errors are one line,
exit status 2. The Python API behind it: minblip2.apps.pipeline (`load(run_dir).search(...)`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch

from .. import runtime
from .caption import InputError, add_common_args, folder_files, open_batch, report_skipped, run_cli

CACHE_VERSION = 1


def default_cache(run_dir, folder: Path) -> Path:
    folder = folder.resolve()
    return Path(run_dir) / "search_cache" / f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}.pt"


def _read_cache(path: Path, fingerprint: str) -> dict:
    """{relative path: (size, mtime_ns, embedding (Q, E) or None for a file that is not an image)}."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # truncated, or not ours: start afresh
        print(f"ignoring unreadable search cache {path} ({type(e).__name__})", file=sys.stderr)
        return {}
    if state.get("version") != CACHE_VERSION or state.get("model") != fingerprint:
        return {}  # another checkpoint: its embeddings mean nothing to this one
    return {rel: (size, mtime, None if row < 0 else state["embeds"][row])
            for rel, (size, mtime, row) in state["files"].items()}


def _write_cache(path: Path, fingerprint: str, entries: dict):
    rows = [e for _, _, e in entries.values() if e is not None]
    files, n = {}, 0
    for rel, (size, mtime, emb) in entries.items():
        files[rel] = (size, mtime, -1 if emb is None else n)
        n += emb is not None
    state = {"version": CACHE_VERSION, "model": fingerprint, "files": files,
             "embeds": torch.stack(rows) if rows else torch.zeros(0)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a search running at the same time reads the old or the new cache
    except OSError as e:
        print(f"could not write the search cache {path} ({e}); the next search will encode again", file=sys.stderr)


def index_folder(blip, folder, cache: Path | None = None, progress: bool = True):
    """(image paths, their embeddings (N, Q, E), skipped non-images, how many were encoded now) of `folder`'s images.

    With `cache`, unchanged files (same size and modification time) are read from it and the cache is rewritten
    when anything changed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"no such folder: {folder}")
    files = folder_files(folder)
    if not files:
        raise InputError(f"folder {folder} has no files in it")
    old = _read_cache(cache, blip.fingerprint) if cache else {}
    entries, todo = {}, []
    for f in files:
        st = f.stat()
        rel = str(f.relative_to(folder))
        hit = old.get(rel)
        if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
            entries[rel] = hit
        else:
            entries[rel] = (st.st_size, st.st_mtime_ns, None)
            todo.append(f)
    bar = runtime.progress_bar(None, progress and bool(todo), total=len(todo), desc="encoding images", unit="img")
    encoded = 0
    for i in range(0, len(todo), blip.batch_size):
        bad = []
        images, kept = open_batch(todo[i:i + blip.batch_size], bad)
        if images:
            encoded += len(images)
            for f, emb in zip(kept, blip.embed_images(images)):
                size, mtime, _ = entries[str(f.relative_to(folder))]
                entries[str(f.relative_to(folder))] = (size, mtime, emb.clone())
        bar.update(len(todo[i:i + blip.batch_size]))
    bar.close()
    if cache and (todo or set(old) != set(entries)):
        _write_cache(cache, blip.fingerprint, entries)
    paths = [folder / rel for rel, (_, _, e) in entries.items() if e is not None]
    skipped = [folder / rel for rel, (_, _, e) in entries.items() if e is None]
    embeds = torch.stack([e for _, _, e in entries.values() if e is not None]) if paths else None
    return paths, embeds, skipped, encoded


def _search(argv):
    p = argparse.ArgumentParser(prog="minblip2-search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory with a stage-1 checkpoint (minblip2-coco-mini / minblip2-train)")
    p.add_argument("queries", nargs="+", help="what to look for, one or more texts")
    p.add_argument("--images", required=True, help="the folder of images to search (sub-folders included)")
    p.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--rerank", type=int, default=0, help="re-score the ITC top N with the ITM head (default 0: off)")
    p.add_argument("--cache", help="the embedding cache file (default: <run_dir>/search_cache/<folder>-<hash>.pt)")
    p.add_argument("--no_cache", action="store_true", help="encode every image, read and write no cache")
    add_common_args(p)
    args = p.parse_args(argv)

    from .pipeline import load

    folder = Path(args.images)
    if not folder.is_dir():  # before loading any model: bad input fails fast
        raise InputError(f"no such folder: {folder}")
    if not folder_files(folder):
        raise InputError(f"folder {folder} has no files in it")
    blip = load(args.run_dir, stages=(1,), device=args.device, batch_size=args.batch_size, amp=args.amp)
    cache = None if args.no_cache else Path(args.cache) if args.cache else default_cache(args.run_dir, folder)
    paths, embeds, skipped, encoded = index_folder(blip, folder, cache, progress=not args.no_progress)
    report_skipped(skipped, len(paths) + len(skipped))
    if not paths:
        raise InputError(f"none of the {len(skipped)} files in {folder} is an image")
    print(f"{len(paths)} images in {folder}: {encoded} encoded now, {len(paths) - encoded} from the cache",
          file=sys.stderr)
    results = blip.search(args.queries, paths, k=args.k, rerank=args.rerank, image_embeds=embeds)
    for query, hits in zip(args.queries, results):
        print(query)
        for rank, h in enumerate(hits, 1):
            scores = f"{h.score:.3f}" if h.itm is None else f"{h.score:.3f} (ITC {h.itc:.3f}, ITM {h.itm:.2f})"
            print(f"{rank:4d}  {scores}  {paths[h.index]}")


def main(argv=None):
    return run_cli(_search, argv)


if __name__ == "__main__":
    sys.exit(main())
