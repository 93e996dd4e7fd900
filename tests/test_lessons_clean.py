"""The committed lesson notebooks contain no COCO data.

COCO photos and human captions are shown when a lesson runs, never stored: cells that display them call
`show_coco` (lessons/course.py) and carry the cell tag `coco-data`, whose outputs scripts/execute_lessons.py clears
when it stores a notebook. These tests check every notebook under lessons/ (solutions included):

- always: the tag mechanism clears outputs; tagged cells store no output at all (so no image); a cell that calls
  `show_coco` carries the tag; a tagged cell is not an `# NBVAL_CHECK_OUTPUT` cell (nbval would compare its
  empty stored output with a real one);
- with coco-mini present (it is read from the data root, not from the repository): no stored text — outputs or
  sources — contains a coco-mini human caption (compared as lowercase words, so `pre_caption`'d copies count), and
  no stored image is a coco-mini image file. Without the data those two are skipped, with the reason.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re

import nbformat
import pytest

from minblip2.config import REPO_ROOT, default_data_root

LESSONS = REPO_ROOT / "lessons"
NOTEBOOKS = sorted(p for p in LESSONS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
TAG = "coco-data"
DISPLAY_CALL = re.compile(r"(?<!def )\bshow_coco\(")  # a call of the display helper (not its definition)
DATA = default_data_root()
needs_data = pytest.mark.skipif(not (DATA / "captions.jsonl").is_file(),
                                reason=f"coco-mini not found at {DATA}: the caption and image comparison needs it "
                                       "(the tag checks above still ran)")
ids = [str(p.relative_to(LESSONS)) for p in NOTEBOOKS]


def _load_execute_lessons():
    spec = importlib.util.spec_from_file_location("execute_lessons", REPO_ROOT / "scripts" / "execute_lessons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(path):
    return [(i, c) for i, c in enumerate(nbformat.read(path, as_version=4).cells) if c.cell_type == "code"]


def _tagged(cell) -> bool:
    return TAG in cell.metadata.get("tags", [])


def _stored_texts(path):
    """(where, text) for every cell source and every stored text output of a notebook."""
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        yield f"cell {i} source", cell.source
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                yield f"cell {i} output", out.get("text", "")
            elif out.get("output_type") == "error":
                yield f"cell {i} error", out.get("evalue", "") + "\n".join(out.get("traceback", []))
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") or mime.endswith("json"):
                    yield f"cell {i} {mime}", value if isinstance(value, str) else json.dumps(value)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


class CaptionIndex:
    """Finds any of a set of captions inside a text, as whole words, ignoring case and punctuation."""

    K = 4  # captions are indexed by their first K words; every coco-mini caption has at least 7

    def __init__(self, captions):
        self.by_start = {}
        for caption in captions:
            w = tuple(_words(caption))
            if len(w) >= self.K:
                self.by_start.setdefault(w[: self.K], set()).add(w)

    def find(self, text: str) -> list[str]:
        w = _words(text)
        hits = []
        for i in range(len(w) - self.K + 1):
            for caption in self.by_start.get(tuple(w[i: i + self.K]), ()):
                if tuple(w[i: i + len(caption)]) == caption:
                    hits.append(" ".join(caption))
        return hits


@pytest.fixture(scope="module")
def coco_captions():
    with open(DATA / "captions.jsonl") as f:
        return CaptionIndex(c for line in f for c in json.loads(line)["captions"])


# ----------------------------------------------------------------------------- always: the tag


def test_notebooks_found():
    names = {p.name for p in NOTEBOOKS}
    assert "00_data.ipynb" in names and any(p.parent.name == "solutions" for p in NOTEBOOKS), sorted(names)


def test_execute_lessons_clears_tagged_cells():
    clean = _load_execute_lessons().clean
    nb = nbformat.v4.new_notebook()
    shown = nbformat.v4.new_code_cell("show_coco(paths, captions)", metadata={"tags": [TAG]})
    shown.outputs = [nbformat.v4.new_output("stream", text="a caption\n"),
                     nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})]
    kept = nbformat.v4.new_code_cell("print(1)")
    kept.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells = [shown, kept]
    clean(nb)
    assert shown.outputs == [] and shown.execution_count is None
    assert kept.outputs[0]["text"] == "1\n"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_tagged_cells_store_no_output(path):
    for i, cell in _code_cells(path):
        if not _tagged(cell):
            continue
        images = [m for out in cell.outputs for m in out.get("data", {}) if m.startswith("image/")]
        assert not images, f"{path.name} cell {i} ({TAG}) stores an image: {images}; re-run scripts/execute_lessons.py"
        assert cell.outputs == [], f"{path.name} cell {i} ({TAG}) stores outputs; re-run scripts/execute_lessons.py"
        assert not cell.source.startswith("# NBVAL_CHECK_OUTPUT"), \
            f"{path.name} cell {i}: a {TAG} cell stores no output, so nbval cannot compare it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_cells_showing_coco_are_tagged(path):
    for i, cell in _code_cells(path):
        if DISPLAY_CALL.search(cell.source):
            assert _tagged(cell), f"{path.name} cell {i} calls show_coco but has no '{TAG}' tag:\n{cell.source}"


# ----------------------------------------------------------------------------- with the data: its content


def test_caption_index_finds_a_caption():
    index = CaptionIndex(["A dog sleeping on a shoe rack in the sun."])
    assert index.find("model says: a dog sleeping on a shoe rack in the sun!") == ["a dog sleeping on a shoe rack in the sun"]
    assert index.find("A dog sleeping on a shoe rack") == []  # a prefix is not the caption


@needs_data
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_coco_caption_stored(path, coco_captions):
    for where, text in _stored_texts(path):
        hits = coco_captions.find(text)
        assert not hits, f"{path.name} {where} contains coco-mini human caption(s) {hits[:3]}"


@needs_data
def test_no_coco_image_stored():
    files = {hashlib.sha1(p.read_bytes()).hexdigest() for p in (DATA / "images").iterdir() if p.is_file()}
    assert files, f"no image files under {DATA / 'images'}"
    for path in NOTEBOOKS:
        for i, cell in _code_cells(path):
            for out in cell.outputs:
                for mime, value in out.get("data", {}).items():
                    if mime.startswith("image/") and mime != "image/svg+xml":
                        digest = hashlib.sha1(base64.b64decode(value)).hexdigest()
                        assert digest not in files, f"{path.name} cell {i} stores a coco-mini image file ({mime})"
