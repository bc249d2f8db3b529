"""tokenmill: an LLM inference server with TGI's and OpenAI's APIs."""

from tokenmill.protocol import FinishReason, GrammarSpec, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "FinishReason", "GrammarSpec", "SamplingParams", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy: importing the package must not pull torch (the API process and tools stay light).
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from tokenmill.frontend.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
