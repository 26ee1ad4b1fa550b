"""edgellm: a lightweight LLM inference runtime for edge devices.

    import edgellm
    llm = edgellm.load("gemma3-270m")
    print(llm.chat([{"role": "user", "content": "Hello!"}]))
"""

__version__ = "0.1.0"

from .errors import EdgeLLMError  # noqa: E402
from .runtime.api import LLM, InvalidArgument, load  # noqa: E402
from .runtime.chat_template import ChatTemplateError  # noqa: E402
from .runtime.engine import Event  # noqa: E402
from .runtime.sampler import SamplingParams  # noqa: E402

__all__ = ["LLM", "ChatTemplateError", "EdgeLLMError", "Event", "InvalidArgument", "SamplingParams", "load",
           "__version__"]
