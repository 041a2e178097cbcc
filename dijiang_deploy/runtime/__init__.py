"""Runtime: fixed-memory generation over exported DiJiang graphs."""

from .generator import GenerationResult, GenerationStats, Generator, StreamEvent
from .sampling import SamplingOptions

__all__ = ["GenerationResult", "GenerationStats", "Generator", "SamplingOptions", "StreamEvent"]
