"""Shapes, layer placement, parameter counts and exportability of the models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import istfx
from istfx.models import ISTMLP, SmallCNN


def _linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _bn_params(model: nn.Module) -> int:
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    )


# -- ISTMLP -------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 5, 64])
@pytest.mark.parametrize("hidden", [16, [32, 8], (8, 8, 8)])
def test_mlp_output_shape(batch: int, hidden: int | list[int]) -> None:
    model = ISTMLP(20, hidden, 7)
    out = model(torch.randn(batch, 20))
    assert out.shape == (batch, 7)
    assert out.dtype == torch.float32


def test_mlp_layer_placement() -> None:
    model = ISTMLP(10, [6, 4], 3)
    kinds = [type(m) for m in model.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    for i, width in ((0, 6), (3, 4)):
        linear, bn = model.layers[i], model.layers[i + 1]
        assert linear.bias is None and linear.out_features == width
        assert bn.num_features == width and bn.affine and not bn.track_running_stats
        assert bn.running_mean is None and bn.running_var is None
    assert isinstance(model.head, nn.Linear) and model.head.bias is None
    assert model.head.in_features == 4 and model.head.out_features == 3
    assert isinstance(model.logit_norm, nn.Identity)
    assert len(list(model.buffers())) == 0


def test_mlp_logit_norm() -> None:
    model = ISTMLP(10, 8, 3, logit_norm=True)
    norm = model.logit_norm
    assert isinstance(norm, nn.BatchNorm1d)
    assert norm.num_features == 3 and not norm.affine and not norm.track_running_stats
    out = model(torch.randn(32, 10))
    # Batch statistics: every logit column is normalised to zero mean.
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
    # The non-affine norm adds no parameters.
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in ISTMLP(10, 8, 3).parameters()
    )


def test_mlp_parameter_count_paper_size() -> None:
    model = ISTMLP(64, [4096, 4096], 10)
    linear = 64 * 4096 + 4096 * 4096 + 4096 * 10
    bn = 2 * 2 * 4096
    assert _linear_weights(model) == linear
    assert _bn_params(model) == bn
    assert sum(p.numel() for p in model.parameters()) == linear + bn


def test_mlp_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        ISTMLP(10, [], 3)
    with pytest.raises(ValueError):
        ISTMLP(10, [8, 0], 3)


def test_mlp_eval_mode_uses_batch_statistics() -> None:
    torch.manual_seed(0)
    model = ISTMLP(6, 5, 2).eval()
    x = torch.randn(8, 6)
    # Without running statistics, eval mode normalises with the batch too.
    torch.testing.assert_close(model(x), model.train()(x))


# -- SmallCNN -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 3, 33])
def test_cnn_output_shape(batch: int) -> None:
    model = SmallCNN()
    out = model(torch.randn(batch, 1, 8, 8))
    assert out.shape == (batch, 10)


def test_cnn_other_sizes() -> None:
    model = SmallCNN(in_channels=3, num_classes=4, width=8, image_size=12)
    assert model(torch.randn(4, 3, 12, 12)).shape == (4, 4)
    with pytest.raises(ValueError):
        SmallCNN(image_size=7)


def test_cnn_layer_placement_and_count() -> None:
    width, classes = 8, 10
    model = SmallCNN(in_channels=1, num_classes=classes, width=width, image_size=8)
    kinds = [type(m) for m in model.features]
    block = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert kinds == block + block + [nn.MaxPool2d]
    conv1, bn1, _, conv2, bn2, _, _ = model.features
    assert conv1.kernel_size == (3, 3) and conv1.padding == (1, 1) and conv1.bias is None
    assert conv2.kernel_size == (3, 3) and conv2.padding == (1, 1) and conv2.bias is None
    assert bn1.num_features == width and bn2.num_features == 2 * width
    assert [type(m) for m in model.classifier] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    fc1, fc2 = model.classifier[1], model.classifier[3]
    assert fc1.in_features == 2 * width * 4 * 4 and fc1.out_features == 4 * width
    assert fc2.in_features == 4 * width and fc2.out_features == classes

    expected = (
        1 * width * 9  # conv1
        + 2 * width  # bn1
        + width * 2 * width * 9  # conv2
        + 2 * 2 * width  # bn2
        + (2 * width * 16) * (4 * width) + 4 * width  # fc1
        + 4 * width * classes + classes  # fc2
    )
    assert sum(p.numel() for p in model.parameters()) == expected


# -- torch.export ---------------------------------------------------------------


def _export(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    auto = torch.export.Dim.AUTO
    dims = {0: auto, **{d: torch.export.Dim.STATIC for d in range(1, x.dim())}}
    return torch.export.export(model, (x,), dynamic_shapes=(dims,), strict=False)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: ISTMLP(12, [16, 8], 5), (4, 12)),
        (lambda: ISTMLP(12, 16, 5, logit_norm=True), (4, 12)),
        (lambda: SmallCNN(width=4), (4, 1, 8, 8)),
    ],
    ids=["mlp", "mlp-logit-norm", "cnn"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_models_export_with_dynamic_batch(
    make: Callable[[], nn.Module], shape: tuple[int, ...], training: bool
) -> None:
    torch.manual_seed(0)
    model = make().train(training)
    ep = _export(model, torch.randn(*shape))
    module = ep.module()
    for batch in (3, 17):
        x = torch.randn(batch, *shape[1:])
        out = module(x)
        expected = model(x)
        assert out.shape[0] == batch and out.shape == expected.shape
        torch.testing.assert_close(out, expected)


def test_hf_vision_model_without_example_inputs_takes_images_from_its_config() -> None:
    """ViT's generic ``dummy_inputs`` hold input_ids; its config says what an image is."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          image_size=(24, 16), patch_size=8, num_channels=2, num_labels=3)
    ist = istfx.compile(tf.ViTForImageClassification(config), subnets=2)
    assert ist.captured.kwargs["pixel_values"].shape == (2, 2, 24, 16)
    assert ist.plan.split
    assert ist.decompose(0)[1](pixel_values=torch.randn(3, 2, 24, 16)).logits.shape == (3, 3)
