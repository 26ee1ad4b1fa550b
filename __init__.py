"""edgellm: a lightweight LLM inference runtime for edge devices."""

__version__ = "0.1.0"
