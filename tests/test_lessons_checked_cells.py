"""nbval compares a `# NBVAL_CHECK_OUTPUT` cell's outputs with the stored ones, stderr included.

A call that computes the image-feature cache prints a progress bar to stderr the first time it runs (a fresh
machine, as in CI) and nothing once the cache exists (the machine that stored the notebook). So such a call must
sit in a cell of its own that nbval does not check, and the checked cell after it prints what was built. This
failed CI once (lesson 5); this test finds it without a cold cache.
"""
from __future__ import annotations

import re

import pytest

from test_lessons_clean import NOTEBOOKS, _code_cells, ids

# everything that may encode images into the cache (features.cached_features is what they all call)
CACHE_FILLERS = re.compile(r"\b(ImageTextData\.build|TestSplit|cached_features|encode_images)\(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_checked_cells_do_not_fill_the_feature_cache(path):
    bad = [(i, m.group(1)) for i, cell in _code_cells(path) if "NBVAL_CHECK_OUTPUT" in cell.source
           for m in [CACHE_FILLERS.search(cell.source)] if m]
    assert not bad, (f"{path.name}: cells {bad} are output-checked and may fill the feature cache, whose progress "
                     "bar goes to stderr on a fresh machine: move that call into an unchecked cell before it")


def test_the_pattern_finds_a_cache_filler():
    assert CACHE_FILLERS.search("data = ImageTextData.build(cfg, 'train', cache=True)")
    assert CACHE_FILLERS.search("test = TestSplit(cfg, tokenizer, device)")
    assert not CACHE_FILLERS.search("print(tuple(test.features.shape))")
