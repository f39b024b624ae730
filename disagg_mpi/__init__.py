"""disagg-mpi: disaggregated LLM serving (context and generation executors) as one MPI job."""

from .api import (
    CacheTransceiverConfig,
    CommType,
    ContextPhaseParams,
    ExecutorConfig,
    GuidedDecodingParams,
    KvCacheConfig,
    OutputConfig,
    Request,
    RequestType,
    Response,
    Result,
    SamplingConfig,
    TokenLogprobs,
)

__all__ = [
    "CacheTransceiverConfig",
    "CommType",
    "ContextPhaseParams",
    "DisaggOrchestrator",
    "Executor",
    "ExecutorConfig",
    "GuidedDecodingParams",
    "KvCacheConfig",
    "OutputConfig",
    "Request",
    "RequestType",
    "Response",
    "Result",
    "SamplingConfig",
    "TokenLogprobs",
    "launch",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package must not initialise MPI or torch.
    if name == "launch":
        from .spmd import launch

        return launch
    if name == "Executor":
        from .engine.executor import Executor

        return Executor
    if name == "DisaggOrchestrator":
        from .orchestrator.orchestrator import DisaggOrchestrator

        return DisaggOrchestrator
    raise AttributeError(name)
