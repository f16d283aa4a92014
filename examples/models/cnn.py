"""A small CNN for 8x8 digit images.

    istfx inspect examples/models/cnn.py --subnets 4 --graph cnn.svg

IST splits the convolution channels (with their BatchNorm entries) and the
hidden units of the classifier; the input channel and the logits are shared.
"""
import torch
from istfx.models import SmallCNN

model = SmallCNN()
example_inputs = (torch.randn(8, 1, 8, 8),)
