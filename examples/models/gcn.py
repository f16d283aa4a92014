"""A two-layer GCN (PyTorch Geometric) on Zachary's karate club.

    istfx inspect examples/models/gcn.py --subnets 4

As in GIST, the hidden feature dimensions of the graph convolutions are split;
the node features, the class logits and the output bias are shared.
"""
from torch_geometric.datasets import KarateClub
from torch_geometric.nn.models import GCN

dataset = KarateClub()  # built in: no download
data = dataset[0]
model = GCN(
    in_channels=dataset.num_features,
    hidden_channels=64,
    num_layers=2,
    out_channels=dataset.num_classes,
    dropout=0.0,
)
example_inputs = (data.x, data.edge_index)
