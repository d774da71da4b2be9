"""The owner's console: a web page on the worker's console port (`--console-port`) where the
data owner sees his worker and answers release requests, and `/metrics` for Prometheus."""
from .app import Console

__all__ = ["Console"]
