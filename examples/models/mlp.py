"""The IST paper's fully connected network, small: 64 -> 256 -> 256 -> 10.

    istfx inspect examples/models/mlp.py --subnets 4

IST splits the hidden neurons of both layers (with their BatchNorm entries);
the 64 input features and the 10 logits are shared by every subnet.
"""
import torch
from istfx.models import ISTMLP

model = ISTMLP(64, [256, 256], 10)
example_inputs = (torch.randn(8, 64),)
