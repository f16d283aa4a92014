"""The torch.distributed backend by its historical module name: ``TorchDistBackend(topology, ...)``.

``TorchDistBackend("ps", ...)`` builds :class:`~istfx.backends.torch_ps.TorchPSBackend`
(rank 0 holds the model; survives failed workers) and
``TorchDistBackend("sharded", ...)`` builds
:class:`~istfx.backends.torch_sharded.TorchShardedBackend` (no rank holds the
model). What they share lives in :mod:`istfx.backends.torch_base`.
"""
from __future__ import annotations

from .memory import peak_rss_mb, reset_peak_rss, rss_mb
from .model_storage import materialize_model, release_model
from .torch_base import TOPOLOGIES, TorchDistBackend, init_distributed
from .torch_ps import TorchPSBackend
from .torch_sharded import TorchShardedBackend

__all__ = ["TOPOLOGIES", "TorchDistBackend", "TorchPSBackend", "TorchShardedBackend", "init_distributed",
           "materialize_model", "peak_rss_mb", "release_model", "reset_peak_rss", "rss_mb"]
