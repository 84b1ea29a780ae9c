"""Data files of the export stage (kept in a package so that they install with it)."""
