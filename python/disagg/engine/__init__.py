"""The single-process engine: scheduler, sampling, request bookkeeping."""
from .engine import Engine
from .request import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .scheduler import SchedulerConfig

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams", "SchedulerConfig"]
