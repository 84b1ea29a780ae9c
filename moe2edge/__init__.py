"""moe2edge: the glue between the stages (console script and the end-to-end demo).

The stages themselves are the top-level packages ``distill``, ``export``, ``runtime``
and ``jetson``; each is a library with a small public API.
"""

__version__ = "0.1.0"
