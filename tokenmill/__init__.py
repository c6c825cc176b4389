"""tokenmill: an LLM inference engine built around the memory wall."""

from tokenmill.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["SamplingParams", "InvalidRequestError"]
__version__ = "0.1.0"
