"""Use a trained run: the Python API (pipeline.py) and the commands minblip2-caption and minblip2-search."""
