"""A small CNN on scikit-learn's 8x8 digit images: conv 1 -> 16 -> 32 channels, classifier 512 -> 64 -> 10.

    istfx train examples/models/cnn_digits.py --subnets 4 --rounds 30 --local-steps 10
    istfx fl examples/models/cnn_digits.py --clients 16 --subnets 4 --rounds 20 --participation 0.25 --dirichlet 0.5

IST splits the convolution channels (with their BatchNorm entries) and the
classifier's hidden units; the input channel and the 10 logits are shared.
The data are the 1797 digits bundled with scikit-learn (no download) as
``[N, 1, 8, 8]`` images in [0, 1]: 75% for training (sharded across subnets
by ``istfx train``, split across clients by ``istfx fl``), 25% for testing.
"""
import torch
from istfx.models import SmallCNN

from istfx.runtime.data import digits


def build_model():
    return SmallCNN(in_channels=1, num_classes=10, width=16, image_size=8)


example_inputs = (torch.randn(8, 1, 8, 8),)


def train_data():
    return digits(seed=0, image=True)[0]


def eval_data():
    return digits(seed=0, image=True)[1]
