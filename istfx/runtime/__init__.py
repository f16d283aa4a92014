"""The runtime: the training loop (``fit``), the backend contract (``backend_api``), checkpoints, communication accounting, data loaders, launching ranks."""
