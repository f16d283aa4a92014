"""istfx.compile time over a bare ``torch.export.export(model, args, strict=False)`` of the same model.

    python benchmarks/capture_time.py              # 4 models, 3 alternating pairs each (~1-2 min)
    python benchmarks/capture_time.py --repeats 5 --only swin

Models (plain torch, no torchvision): an MLP, a ResNet-style CNN (BasicBlocks,
BatchNorm, in-place residual adds, adaptive pooling), GPT-2 tiny from
transformers, and a Swin-style network (patch embedding, shifted-window
attention with ``torch.roll`` and window partitioning by view/permute, patch
merging). Each model is built once per timed pair; the bare export and
``istfx.compile`` (S = 2) run on fresh copies, alternating, one torch thread.
The ratio reported is the median over pairs of compile time / export time.
A third column exports with the dims istfx made dynamic (what istfx's own
export costs; dynamic dims make torch.export slower than a static export).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class ResNetish(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(x: torch.Tensor, w: int, B: int, H: int, W: int) -> torch.Tensor:
    C = x.shape[-1]
    x = x.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


class WindowBlock(nn.Module):
    """Swin block: (shifted) window attention with padding to a window multiple, then an MLP."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.bias = nn.Parameter(torch.zeros(heads, window * window, window * window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        w = self.window
        y = self.norm1(x)
        pad_h, pad_w = (w - H % w) % w, (w - W % w) % w
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = window_partition(y, w)
        n = win.shape[1]
        qkv = self.qkv(win).reshape(win.shape[0], n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1) + self.bias
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], n, C)
        y = window_reverse(self.proj(out), w, B, Hp, Wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :H, :W, :].contiguous()
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinLike(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, window: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(WindowBlock(dim, heads, window, 0), WindowBlock(dim, heads, window, window // 2))
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(WindowBlock(2 * dim, 2 * heads, window, 0),
                                    WindowBlock(2 * dim, 2 * heads, window, window // 2))
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(x.mean(dim=(1, 2)))


def gpt2_tiny() -> tuple[nn.Module, tuple]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 97, (2, 8))
    return model, (ids,)


MODELS = {
    "mlp": lambda: (MLP(), (torch.randn(4, 32),)),
    "resnet": lambda: (ResNetish(), (torch.randn(2, 3, 32, 32),)),
    "gpt2": gpt2_tiny,
    "swin": lambda: (SwinLike(), (torch.randn(2, 3, 56, 56),)),
}


def time_pair(name: str) -> tuple[float, float, float]:
    import istfx

    torch.manual_seed(0)
    model, args = MODELS[name]()
    bare, ours, same = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    start = time.perf_counter()
    torch.export.export(bare, args, strict=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    ist = istfx.compile(ours, subnets=2, example_inputs=args)
    compile_s = time.perf_counter() - start
    dims = ist.captured.shapes.dims
    names = list(dims)
    shapes = tuple({d: torch.export.Dim.AUTO for d, size in enumerate(dims[n][0]) if not isinstance(size, int)}
                   or None for n in names)
    if getattr(same, "config", None) is not None:
        same.config.use_cache = False
    start = time.perf_counter()
    torch.export.export(same, args, strict=False, dynamic_shapes=shapes)
    dynamic_s = time.perf_counter() - start
    return export_s, compile_s, dynamic_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(MODELS))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    time_pair("mlp")  # warm-up: first-use imports and dispatcher caches
    ratios, same = {}, {}
    print(f"{'model':<8} {'export s':>9} {'compile s':>10} {'ratio':>6} {'dyn export s':>13} {'ratio':>6}")
    for name in opts.only:
        runs = [time_pair(name) for _ in range(opts.repeats)]
        export_s, compile_s, dynamic_s = (statistics.median(r[i] for r in runs) for i in range(3))
        ratios[name] = statistics.median(c / e for e, c, _ in runs)
        same[name] = statistics.median(c / d for _, c, d in runs)
        print(f"{name:<8} {export_s:>9.2f} {compile_s:>10.2f} {ratios[name]:>6.2f} {dynamic_s:>13.2f} "
              f"{same[name]:>6.2f}", flush=True)
    print(f"compile / static export: median {statistics.median(ratios.values()):.2f}, worst {max(ratios.values()):.2f}")
    print(f"compile / export with the same dynamic dims: median {statistics.median(same.values()):.2f}, "
          f"worst {max(same.values()):.2f}")


if __name__ == "__main__":
    main()
