"""The IST paper's fully connected network on scikit-learn's digits: 64 -> 256 -> 256 -> 10.

    istfx train examples/models/mlp_digits.py --subnets 4 --rounds 30 --local-steps 10

IST splits the hidden neurons of both layers (with their BatchNorm entries);
the 64 input features and the 10 logits are shared by every subnet. The
data are the 1797 8x8 digits bundled with scikit-learn (no download): 75%
for training, sharded across the subnets by `istfx train`, 25% for testing.
"""
import torch
from istfx.models import ISTMLP

from istfx.runtime.data import digits


def build_model():
    return ISTMLP(64, [256, 256], 10)


example_inputs = (torch.randn(8, 64),)


def train_data():
    return digits(seed=0)[0]


def eval_data():
    return digits(seed=0)[1]
