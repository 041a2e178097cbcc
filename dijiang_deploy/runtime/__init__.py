"""Runtime: fixed-memory generation over exported DiJiang graphs."""

from .generator import GenerationResult, GenerationStats, GenerationStream, Generator, StreamEvent
from .sampling import SamplingOptions

__all__ = [
    "GenerationResult", "GenerationStats", "GenerationStream", "Generator", "SamplingOptions", "StreamEvent",
]
