"""The runtime: the training loop (``fit``), checkpoints, communication accounting, data loaders, launching ranks."""
