"""moe2edge: distil an MoE teacher, export the student, run it on an edge device.

The stages are subpackages, each a library with a small public API:
``moe2edge.distill``, ``moe2edge.export``, ``moe2edge.runtime`` and ``moe2edge.jetson``.
Their folders sit at the top of the repository (``distill/``, ``export/``, ``runtime/``,
``jetson/``); pyproject.toml maps them into this namespace. This package itself holds only
the glue: the console script (``moe2edge.cli``) and the end-to-end demo (``moe2edge.demo``).
"""

__version__ = "0.1.0"
