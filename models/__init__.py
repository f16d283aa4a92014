"""Reference models used by the examples, tests and benchmarks.

``ISTMLP`` is the fully connected network from the Independent Subnet
Training paper: IST partitions its hidden neurons across workers.
``SmallCNN`` is a compact convolutional network sized for 8x8 digit images;
IST partitions its convolution channels and hidden units.
``PreActResNet`` (pre-activation blocks) and ``ResNet`` (post-activation
blocks) are CIFAR-style ResNets of depth 18/34/50/101: ResIST deals out
their residual blocks among subnets.
``GPT`` is a small decoder-only Transformer language model (nanoGPT style):
IST splits its attention heads and MLP units, and can deal out its blocks.
``GCN`` and ``GraphSAGE`` are the graph networks of GIST: their hidden
feature dimensions are split into independent sub-GCNs.
"""

from .cnn import SmallCNN
from .gnn import GCN, GraphSAGE
from .gpt import GPT, GPTConfig
from .mlp import ISTMLP
from .resnet import PreActResNet, ResNet

__all__ = ["ISTMLP", "SmallCNN", "PreActResNet", "ResNet", "GPT", "GPTConfig", "GCN", "GraphSAGE"]
