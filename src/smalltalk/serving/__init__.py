"""Serving a trained mixture over HTTP with OpenAI's API (`smalltalk serve`).

    from smalltalk.serving import ServeConfig, create_app, serve
    serve(ServeConfig(path="runs/quickstart/bundle"))           # blocks; SIGTERM finishes in-flight requests
    app = create_app(ServeConfig(path=...))                     # a FastAPI app, for your own ASGI server

Needs the ``[serve]`` extra (FastAPI, uvicorn, httpx, prometheus-client). See docs/serving.md.
"""

from .config import RemoteExpert, ServeConfig

__all__ = ["RemoteExpert", "ServeConfig", "create_app", "serve"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs):
    from .app import serve as _serve

    return _serve(*args, **kwargs)
