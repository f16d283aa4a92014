"""ResIST: a small pre-activation ResNet-18 on scikit-learn's 8x8 digits, residual blocks dealt out.

    istfx inspect examples/models/resnet_digits.py --subnets 2 --blocks '*' --min-depth 2
    istfx train examples/models/resnet_digits.py --backend local --subnets 2 --blocks '*' --no-width --rounds 10

With ``--blocks '*'`` every residual block whose skip is the identity is
dealt out among the subnets (a subnet skips the blocks it does not hold);
the first blocks of ``layer2``..``layer4`` (strided projection shortcuts)
stay in every subnet. Without ``--no-width`` the channels are split too.
The data are the digits as ``[1, 8, 8]`` images scaled to [0, 1].
"""
import torch
from istfx.models import PreActResNet

from istfx.runtime.data import digits


def build_model():
    return PreActResNet(depth=18, num_classes=10, in_channels=1, width=8)


example_inputs = (torch.randn(8, 1, 8, 8),)


def train_data():
    return digits(seed=0, image=True)[0]


def eval_data():
    return digits(seed=0, image=True)[1]
