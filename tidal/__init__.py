"""Tidal: LLM serving for spiky chat load, with disaggregated prefill and decode."""

from tidal.protocol import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Import the engine lazily: `import tidal` stays cheap for the frontend and the tools.
    if name == "LLM":
        from tidal.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
