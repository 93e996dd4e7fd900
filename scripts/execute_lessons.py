#!/usr/bin/env python
"""Execute lesson notebooks in place, top to bottom, and store their fresh outputs.

    .venv/bin/python scripts/execute_lessons.py lessons/*.ipynb          (what `make lessons` runs)
    .venv/bin/python scripts/execute_lessons.py lessons/02_qformer.ipynb --timeout 120
    .venv/bin/python scripts/execute_lessons.py lessons/solutions/*.ipynb            (the exercises' solutions)

- The kernel is THIS interpreter (sys.executable), whatever kernelspecs are installed: a `python3`
  kernelspec installed with `--user` from another environment would otherwise silently run the
  notebooks there (the "kernel trap"; nbval's --nbval-current-env avoids it the same way).
- Each notebook runs with its own folder (lessons/, lessons/solutions/) as the working directory, with a
  per-cell timeout.
- Diffs stay clean: no execution-timing metadata, no widget state, no widget outputs.
- Cells tagged `coco-data` (COCO_TAG) run like any other, but are stored with NO outputs: they show COCO photos
  and human captions, which are not ours to republish (lessons/course.py's `show_coco` draws them). A learner
  running a lesson sees them; the committed notebook never contains them (tests/test_lessons_clean.py checks).
- A notebook whose cell raises is NOT written back; the script reports it and exits with status 1.
- `--threads N` sets OMP_NUM_THREADS for the kernels. On a machine busy with other work, `--threads 1` avoids
  OpenMP oversubscription, which can make small PyTorch ops 10-70x slower (measured on 2 shared cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from nbconvert.preprocessors import CellExecutionError, ExecutePreprocessor

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
COCO_TAG = "coco-data"  # cells that display COCO data: executed, stored without outputs


class CurrentEnvKernelManager(AsyncKernelManager):
    """Any kernel name -> an IPython kernel started with the interpreter running this script."""

    @property
    def kernel_spec(self):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name=KERNELSPEC["display_name"], language="python", resource_dir="")


def merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks: how a cell's prints get split depends on flush timing."""
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None and prev.get("output_type") == "stream"
                and prev.get("name") == out.get("name")):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def clean(nb) -> None:
    """Drop what changes on every run without meaning anything: timings, widget state, widget views, and
    the run-dependent splitting of printed text into chunks; and every output of a cell tagged COCO_TAG."""
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # nbclient's per-cell timestamps
        cell.metadata.pop("ExecuteTime", None)  # the ExecuteTime extension's
        cell.metadata.pop("collapsed", None)
        if cell.cell_type != "code":
            continue
        if COCO_TAG in cell.metadata.get("tags", []):
            cell.outputs = []  # COCO photos / captions: shown when the lesson runs, never stored
            cell.execution_count = None
            continue
        for out in cell.outputs:
            data = out.get("data")
            if data and WIDGET_MIME in data:
                del data[WIDGET_MIME]
        cell.outputs = merge_streams(cell.outputs)


def execute(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    ep = ExecutePreprocessor(timeout=timeout, kernel_name=KERNELSPEC["name"], record_timing=False,
                             kernel_manager_class=CurrentEnvKernelManager)
    t0 = time.perf_counter()
    ep.preprocess(nb, {"metadata": {"path": str(path.parent.resolve())}})
    seconds = time.perf_counter() - t0
    clean(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell (default 300)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the kernels (default: inherit; 1 helps on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the kernels inherit this process's environment
    failed, total = [], 0.0
    for path in args.notebooks:
        print(f"{path} ...", end=" ", flush=True)
        try:
            seconds = execute(path, args.timeout)
        except CellExecutionError as e:
            print(f"FAILED (not written back)\n{e}", flush=True)
            failed.append(path)
            continue
        total += seconds
        print(f"{seconds:.1f} s", flush=True)
    print(f"{len(args.notebooks) - len(failed)}/{len(args.notebooks)} notebooks executed in {total:.1f} s")
    if failed:
        print("failed: " + " ".join(map(str, failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
