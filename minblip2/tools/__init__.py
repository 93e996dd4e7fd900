"""Research and course tooling around the method: the coco-mini main job, baselines, diagnostics, the dry run,
weight conversion, plots."""
