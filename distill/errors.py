"""Errors the distillation stage raises for bad input."""


class DistillError(Exception):
    """Something the user gave `distill` is wrong; the message says what and what to do."""
