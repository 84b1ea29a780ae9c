"""export: turn a student checkpoint into self-describing bundles for the device.

Public API:

- ``onnx_export.export_fp32`` -- optimum export into a bundle (model + tokenizer + manifest)
- ``parity.check_parity`` -- PyTorch vs ONNX Runtime logits and greedy tokens
- ``verify.verify_io_contract`` -- a bundle's graph still matches its manifest
"""

from export.errors import ExportError

__all__ = ["ExportError"]
