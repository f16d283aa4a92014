"""Reference models used by the examples, tests and benchmarks.

``ISTMLP`` is the fully connected network from the Independent Subnet
Training paper: IST partitions its hidden neurons across workers.
``SmallCNN`` is a compact convolutional network sized for 8x8 digit images;
IST partitions its convolution channels and hidden units.
"""

from .cnn import SmallCNN
from .mlp import ISTMLP

__all__ = ["ISTMLP", "SmallCNN"]
