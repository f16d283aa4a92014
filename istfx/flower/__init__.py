"""Federated IST on Flower (``pip install "istfx[fl]"``).

Modules, one job each:

- :mod:`istfx.flower.wire`: a subnet's description and tensors to and from Flower records.
- :mod:`istfx.flower.settings`: the run config both apps read.
- :mod:`istfx.flower.data`: each client's partition of the training set, in seeded batches.
- :mod:`istfx.flower.local`: a client's local optimizer steps.
- :mod:`istfx.flower.strategy`: :class:`~istfx.flower.strategy.ISTStrategy` (subnets dealt to sampled
  clients, reassembled on the server) and FedAvg with the same per-round record.
- :mod:`istfx.flower.client_app` / :mod:`istfx.flower.server_app`: the ClientApp and ServerApp.
- :mod:`istfx.flower.federation`: SuperLink + SuperNodes on this machine, and the app folder.

``istfx fl MODEL.py`` (:mod:`istfx.cli.fl`) runs all of it. Importing this
package imports neither torch nor Flower.
"""
