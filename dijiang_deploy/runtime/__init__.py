"""Runtime: fixed-memory generation over exported DiJiang graphs (no torch).

:class:`Model` opens an export folder once; a :class:`Session` is one
conversation (its state, position, history and RNG; resumable, forkable,
saved to a state file); the :class:`Engine` batches many requests
continuously; :class:`Generator` is the one-call API over both.
"""

from .engine import Engine
from .generator import GenerationResult, GenerationStream, Generator, StreamEvent
from .model import Model
from .requests import QueueFullError, Request, RequestHandle, RequestOutput
from .sampling import SamplingParams
from .session import GenerationOutput, GenerationStats, Session, SessionStream, TokenEvent
from .tokenizer import Message, TextTokenizer

__all__ = [
    "Engine", "GenerationOutput", "GenerationResult", "GenerationStats", "GenerationStream", "Generator", "Message",
    "Model", "QueueFullError", "Request", "RequestHandle", "RequestOutput", "SamplingParams", "Session",
    "SessionStream", "StreamEvent", "TextTokenizer", "TokenEvent",
]
