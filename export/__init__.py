"""export: turn a student checkpoint into self-describing bundles for the device.

Public API:

- ``onnx_export.export_fp32`` -- optimum export into a bundle (model + tokenizer + manifest)
- ``genai_graph.export_fast`` -- onnxruntime-genai's fused graph into a bundle
- ``quantize.quantize_bundle`` -- FP16 / INT8 (dynamic, static) / INT4 (rtn, hqq, gptq) bundles
- ``tensorrt_flavor.tensorrt_bundle`` -- standard-op FP16 / INT8 / INT4 bundles for TensorRT
- ``check_trt.check_bundle`` -- nodes TensorRT's ONNX parser would refuse
- ``check_trt.check_onnx_for_tensorrt`` -- the pre-checks ``export engine`` runs before a build
- ``rtn.rtn_grid`` -- the round-to-nearest scales and zero points (TensorRT flavour, GPTQ)
- ``weights`` -- graphs without their weights, weights read and written one at a time
  (models above 2 GB); ``layerwise`` -- the layers, and ORT's quantizers one layer at a time
- ``peak_rss.measure`` -- an export step in a fresh process, with its peak RSS
- ``report.report`` -- accuracy of variants against their FP32 parent, through the runtime
- ``variants.build_all_variants`` -- all of the above for one FP32 bundle, with the report
- ``parity.check_parity`` -- PyTorch vs ONNX Runtime logits and greedy tokens
- ``verify.verify_io_contract`` -- a bundle's graph still matches its manifest

See docs/export.md and docs/bundle-format.md.
"""

from moe2edge.export.errors import ExportError

__all__ = ["ExportError"]
