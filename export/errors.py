"""Errors the export stage raises for bad input."""


class ExportError(Exception):
    """Something the user gave `export` is wrong; the message says what and what to do."""
