"""Caption your own images, or ask about them, with a trained run (its stage 2 and frozen LLM).

    minblip2-caption runs/coco-mini photo.jpg                      # the run's decoding (beam search)
    minblip2-caption runs/coco-mini photo.jpg other.png --greedy
    minblip2-caption runs/coco-mini photos/ --num_beams 5           # a folder: every image in it
    minblip2-caption runs/coco-mini photo.jpg --question "What is the dog lying on?"
    minblip2-caption runs/coco-mini photo.jpg --prompt "a painting of"
(`minblip2-caption` is `python -m minblip2.apps.caption`.)

Prints one line per image: its path, a tab, the caption (or answer). A named file that is not an image stops with
an error; files in a folder that are not images are skipped and counted. Errors are one line, exit status 2.
The Python API behind it: minblip2.apps.pipeline (`load(run_dir).caption(...)`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import runtime
from ..offline_weights import MissingWeightsError
from ..data import BadImageError
from .pipeline import HubUnavailableError, RunError, open_image


class InputError(ValueError):
    """A command-line input that cannot work (a missing path, an empty folder)."""


USER_ERRORS = (RunError, BadImageError, InputError, MissingWeightsError, HubUnavailableError)


def folder_files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted; hidden files and folders (.cache, .DS_Store) left out."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def collect_images(inputs: list[str]) -> tuple[list[Path], bool]:
    """(files, any folder given): named files, checked now (one that is not an image is an error), and the files
    of named folders, read later (those that are not images are skipped then)."""
    files, folders = [], False
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            found = folder_files(p)
            if not found:
                raise InputError(f"folder {p} has no files in it")
            files += found
            folders = True
        elif p.is_file():
            open_image(p)  # raises BadImageError naming it
            files.append(p)
        else:
            raise InputError(f"no such file or folder: {p}")
    return files, folders


def open_batch(paths: list[Path], skipped: list[Path]):
    """(PIL images, their paths) of the readable ones; the others are appended to `skipped`."""
    images, kept = [], []
    for p in paths:
        try:
            images.append(open_image(p))
            kept.append(p)
        except BadImageError:
            skipped.append(p)
    return images, kept


def report_skipped(skipped: list[Path], total: int):
    if skipped:
        names = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} of {total} files: not images ({names})", file=sys.stderr)


def add_common_args(p: argparse.ArgumentParser):
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast (default none)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def run_cli(fn, argv):
    """Run a command; a user error becomes one line on stderr (`error: ...`) and exit status 2."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: ours are enough
    try:
        return fn(argv) or 0
    except USER_ERRORS as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


def _caption(argv):
    p = argparse.ArgumentParser(prog="minblip2-caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (minblip2-coco-mini / minblip2-train --stage 2)")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    ask = p.add_mutually_exclusive_group()
    ask.add_argument("--prompt", help="the text after the visual prompt (default: the one the run trained with)")
    ask.add_argument("--question", help='ask a question, in the paper\'s VQA format ("Question: ... Answer:")')
    decode = p.add_mutually_exclusive_group()
    decode.add_argument("--num_beams", type=int, help="beam search width (default: the run's config)")
    decode.add_argument("--greedy", action="store_true", help="greedy decoding (= --num_beams 1)")
    p.add_argument("--max_new_tokens", type=int, help="longest caption in tokens (default: the run's config)")
    add_common_args(p)
    args = p.parse_args(argv)

    from .pipeline import load

    files, folders = collect_images(args.images)  # before loading any model: bad input fails fast
    blip = load(args.run_dir, stages=(2,), device=args.device, batch_size=args.batch_size, amp=args.amp)
    kw = dict(num_beams=1 if args.greedy else args.num_beams, max_new_tokens=args.max_new_tokens)
    skipped = []
    bar = runtime.progress_bar(None, folders and not args.no_progress, total=len(files), desc="captions", unit="img")
    for i in range(0, len(files), args.batch_size):
        images, kept = open_batch(files[i:i + args.batch_size], skipped)
        if images:
            out = (blip.answer(images, args.question, **kw) if args.question
                   else blip.caption(images, prompt=args.prompt, **kw))
            for path, text in zip(kept, out):
                bar.write(f"{path}\t{text}", file=sys.stdout)
        bar.update(len(files[i:i + args.batch_size]))
    bar.close()
    report_skipped(skipped, len(files))
    if len(skipped) == len(files):
        raise InputError(f"none of the {len(files)} files is an image")


def main(argv=None):
    return run_cli(_caption, argv)


if __name__ == "__main__":
    sys.exit(main())
