"""TensorRT engines for a bundle, built and checked on the device (no ``onnx``, no torch).

- ``profiles``: the prefill and decode optimization profiles from the manifest's ``io``
- ``precision``: network typing and builder flags for the bundle's precision
- ``device``: the ``tensorrt`` bindings (imported on use) and the GPU, via the CUDA driver
- ``plan``: ``engine.json`` next to the plan, and the checks that it fits this device and bundle
- ``build``: ``build_engine``, used by ``moe2edge export engine`` and ``moe2edge jetson build-engine``

The runner of a built plan is ``moe2edge.runtime.tensorrt_engine``.
"""
