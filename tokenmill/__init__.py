"""tokenmill: an LLM inference engine built around the memory wall."""

from tokenmill.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["LLM", "SamplingParams", "InvalidRequestError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: it pulls in torch and the model code
        from tokenmill.llm import LLM

        return LLM
    raise AttributeError(name)
