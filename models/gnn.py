"""Graph convolutional networks as trained with GIST, in plain PyTorch.

Two node-classification models, each a stack of ``num_layers`` graph
convolutions over a graph given as node features ``x [num_nodes, in_channels]``
and an edge list ``edge_index [2, num_edges]`` (row 0: source node, row 1:
target node, messages flow source -> target)::

    from istfx.models import GCN

    model = GCN(in_channels=34, hidden_channels=64, out_channels=4, num_layers=2)
    logits = model(x, edge_index)            # [num_nodes, out_channels]

- ``GCN`` (Kipf & Welling): ``h' = D^-1/2 (A + I) D^-1/2 h W + b``, symmetric
  normalisation with a self loop on every node.
- ``GraphSAGE`` (Hamilton et al., mean aggregator):
  ``h'_i = W_l mean_{j -> i} h_j + b + W_r h_i``.

Hidden layers are ``conv -> [LayerNorm] -> ReLU -> dropout``; ``norm=True``
adds the GIST paper's non-affine LayerNorm over the hidden features. The last
layer maps to ``out_channels`` logits with no activation.

GIST splits the *hidden feature dimensions*: a sub-GCN holds a disjoint subset
of the features of each hidden layer, i.e. the matching output columns (and
bias entries) of the layer producing them and the input rows of the layer
consuming them. Only the output bias is shared. Without ``norm`` cutting a
layer's features equals zeroing them in the full model; with ``norm`` a sub-GCN
normalises over the features it holds, a valid narrower GCN but not the same
function (istfx classifies those groups approximate).

Message passing uses only ``index_select`` and ``index_add``, so the models
capture with ``torch.export`` for any number of nodes and edges.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_graph(x: torch.Tensor, edge_index: torch.Tensor, in_channels: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_channels:
        raise ValueError(f"x must be [num_nodes, {in_channels}], got {tuple(x.shape)}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be [2, num_edges], got {tuple(edge_index.shape)}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"edge_index must hold integer node ids, got {edge_index.dtype}")


def _scatter_sum(messages: torch.Tensor, target: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sum the rows of `messages` [num_edges, C] into [num_nodes, C] at the rows `target`."""
    out = messages.new_zeros(num_nodes, messages.shape[1])
    return out.index_add(0, target, messages)


def gcn_norm(
    edge_index: torch.Tensor, num_nodes: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edges with a self loop on every node, and their weights ``deg(s)^-1/2 * deg(t)^-1/2``.

    The degree counts incoming edges plus the self loop, so it is at least 1.
    Returns ``(source, target, weight)``, each of length ``num_edges + num_nodes``.
    """
    loops = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    source = torch.cat([edge_index[0], loops])
    target = torch.cat([edge_index[1], loops])
    ones = torch.ones(target.shape[0], dtype=dtype, device=edge_index.device)
    degree = torch.zeros(num_nodes, dtype=dtype, device=edge_index.device).index_add(0, target, ones)
    inv_sqrt = degree.pow(-0.5)
    weight = inv_sqrt.index_select(0, source) * inv_sqrt.index_select(0, target)
    return source, target, weight


class GCNConv(nn.Module):
    """One graph convolution: transform every node, then sum normalised messages from its neighbours."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        num_nodes = x.shape[0]
        source, target, weight = gcn_norm(edge_index, num_nodes, x.dtype)
        h = self.lin(x)
        messages = h.index_select(0, source) * weight.unsqueeze(1)
        return _scatter_sum(messages, target, num_nodes) + self.bias


class SAGEConv(nn.Module):
    """GraphSAGE convolution, mean aggregator: ``lin_l(mean of neighbours) + lin_r(self)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lin_l = nn.Linear(in_channels, out_channels)  # neighbours; carries the bias
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)  # the node itself

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        num_nodes = x.shape[0]
        source, target = edge_index[0], edge_index[1]
        total = _scatter_sum(x.index_select(0, source), target, num_nodes)
        ones = torch.ones(target.shape[0], dtype=x.dtype, device=x.device)
        count = torch.zeros(num_nodes, dtype=x.dtype, device=x.device).index_add(0, target, ones)
        mean = total / count.clamp(min=1).unsqueeze(1)  # isolated nodes aggregate to zero
        return self.lin_l(mean) + self.lin_r(x)


class _GraphNet(nn.Module):
    """A stack of graph convolutions; subclasses choose the convolution."""

    conv_class: type[nn.Module]

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        num_layers: int = 2,
        norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(in_channels, hidden_channels, out_channels) <= 0:
            raise ValueError("in_channels, hidden_channels and out_channels must be positive")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.norm = norm
        self.dropout = dropout
        widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        self.convs = nn.ModuleList(self.conv_class(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Map node features ``[num_nodes, in_channels]`` to logits ``[num_nodes, out_channels]``."""
        _check_graph(x, edge_index, self.in_channels)
        for conv in self.convs[:-1]:
            x = conv(x, edge_index)
            if self.norm:  # non-affine: no per-feature parameters, statistics over the features
                x = F.layer_norm(x, (x.shape[-1],))
            x = F.relu(x)
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.convs[-1](x, edge_index)


class GCN(_GraphNet):
    """Graph convolutional network (symmetric normalisation, self loops), as trained with GIST.

    Args:
        in_channels: node feature size.
        hidden_channels: features of every hidden layer (what GIST splits).
        out_channels: number of output logits per node.
        num_layers: graph convolutions in total (1 means no hidden layer).
        norm: add a non-affine LayerNorm after each hidden convolution.
        dropout: dropout probability after each hidden layer (training only).

    Shapes:
        ``x [num_nodes, in_channels]``, ``edge_index [2, num_edges]`` (int64)
        -> ``[num_nodes, out_channels]``.
    """

    conv_class = GCNConv


class GraphSAGE(_GraphNet):
    """GraphSAGE with the mean aggregator, as trained with GIST.

    Same arguments and shapes as :class:`GCN`.
    """

    conv_class = SAGEConv
