"""The cloud inference service: the heavy model behind ``edgefl.v1.Inference`` (gRPC).

See :mod:`edgefl.server.inference.service` for the API and the status codes.
"""

from edgefl.server.inference.batcher import BatcherStats, BatchResult, MicroBatcher
from edgefl.server.inference.models import (
    HEAVY_MODELS,
    ComputeCancelledError,
    ServedModel,
    TorchServedModel,
    load_or_train,
)
from edgefl.server.inference.service import (
    SERVICE_NAME,
    InferenceServer,
    InferenceServerConfig,
    RunningServer,
    StartCancelledError,
    default_weights_dir,
    serve,
    start_in_thread,
)

__all__ = [
    "HEAVY_MODELS",
    "SERVICE_NAME",
    "BatchResult",
    "BatcherStats",
    "ComputeCancelledError",
    "InferenceServer",
    "InferenceServerConfig",
    "MicroBatcher",
    "RunningServer",
    "ServedModel",
    "StartCancelledError",
    "TorchServedModel",
    "default_weights_dir",
    "load_or_train",
    "serve",
    "start_in_thread",
]
