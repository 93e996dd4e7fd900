"""minblip2: the smallest correct, readable, fully trainable BLIP-2."""
__version__ = "0.1.0"
