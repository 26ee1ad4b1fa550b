"""Error types every part of edgellm raises; the CLI prints their message as one line."""


class EdgeLLMError(Exception):
    """Base of every error edgellm raises on purpose: bad input, bad files, bad settings."""


class GGUFError(EdgeLLMError):
    """A GGUF file is malformed or uses something this reader does not support."""


class StoreError(EdgeLLMError):
    """A model could not be found, fetched, verified or removed."""
