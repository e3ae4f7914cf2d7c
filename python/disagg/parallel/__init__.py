"""Parallel execution over torch.distributed: tensor, pipeline, expert, data and context
parallelism and their combinations (see docs/parallel.md)."""
from .comm import Comm, CollectiveTimeout, CountingTransport
from .engine import ParallelEngine, RequestRouter
from .launch import init_distributed
from .layout import ParallelLayout, RankGroups
from .model import ParallelCausalLM
from .pipeline import PipelineScheduler, StepPipeline

__all__ = ["Comm", "CollectiveTimeout", "CountingTransport", "ParallelEngine", "RequestRouter",
           "init_distributed", "ParallelLayout", "RankGroups", "ParallelCausalLM",
           "PipelineScheduler", "StepPipeline"]
