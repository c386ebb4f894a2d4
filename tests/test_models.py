"""AlexNet shapes and geometry, sparse hypercolumn sampling, batch-norm folding, the backbone file."""

import copy

import pytest
import torch
from torch import nn

from crossflow.models import AlexNet, LAYERS, fold_batch_norm, layer_geometry, load_backbone, save_backbone, sample_at_points
from crossflow.models.hypercolumn import HypercolumnMLP, bilinear_neighbours, project_first, sample_channels_last, sparse_hypercolumn


def test_shapes_at_224():
    shapes = {k: tuple(v.shape[1:]) for k, v in AlexNet()(torch.randn(1, 3, 224, 224), LAYERS).items()}
    assert shapes == {
        "conv1": (96, 56, 56), "pool1": (96, 28, 28), "conv2": (256, 28, 28), "pool2": (256, 14, 14),
        "conv3": (384, 14, 14), "conv4": (384, 14, 14), "conv5": (256, 14, 14), "pool5": (256, 6, 6),
        "fc6": (4096, 1, 1), "fc7": (4096, 1, 1),
    }


def test_grouped_variant_has_half_the_conv2_weights():
    assert AlexNet(groups=2).conv("conv2").weight.shape == (256, 48, 5, 5)


@pytest.mark.parametrize("arch, size", [("crossflow", 224), ("torchvision", 256)])  # 256: torchvision's pool5 field fits
@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "pool2", "conv3", "conv5", "pool5"])
def test_geometry_is_the_receptive_field_centre(layer, arch, size):
    """With max pools swapped for average pools (same windows), the input pixels that reach
    unit j form its receptive field, whose centre must be stride * j + offset."""
    network = AlexNet(arch=arch)
    for name in LAYERS:
        if isinstance(network.layers[name], nn.MaxPool2d):
            pool = network.layers[name]
            network.layers[name] = nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 0.01)
    image = torch.ones(1, 3, size, size, requires_grad=True)
    activation = network(image, [layer])[layer]
    j = activation.shape[-1] // 2  # an interior unit, away from padding
    activation[0, 0, j, j].backward()
    columns = image.grad[0, 0].abs().sum(0).nonzero().flatten()
    stride, offset = layer_geometry(arch=arch)[layer]
    assert (columns.min() + columns.max()).item() / 2 == stride * j + offset


def test_sampling_at_feature_centres_is_exact_for_every_tap():
    network = AlexNet().double()
    activations = network(torch.randn(2, 3, 224, 224, dtype=torch.float64), LAYERS)
    for layer, features in activations.items():
        stride, offset = layer_geometry()[layer]
        h, w = features.shape[-2:]
        jy, jx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        points = torch.stack([stride * jx + offset, stride * jy + offset], -1).reshape(1, -1, 2).expand(2, -1, -1).double()
        sampled = sample_at_points(features, points, stride, offset)
        expected = features.flatten(2).transpose(1, 2)
        torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-9, msg=layer)


def test_sampling_between_centres_is_bilinear_and_clamped_at_borders():
    features = torch.arange(12.0).reshape(1, 1, 3, 4)  # value = 4 * row + column
    points = torch.tensor([[[16 * 1.5, 16 * 0.25], [-100.0, -100.0], [1000.0, 16 * 2.0]]])
    sampled = sample_at_points(features, points, 16.0, 0.0)[0, :, 0]
    assert sampled.tolist() == pytest.approx([4 * 0.25 + 1.5, 0.0, 11.0])


def test_channels_last_sampling_reads_what_grid_sample_reads():
    """The embedding-bag form of the sampling (projected maps) gives grid_sample's values and gradients: inside the map,
    at unit centres, on its last row and column, clamped beyond every border, and on maps one unit high or wide."""
    features = torch.arange(12.0, dtype=torch.float64).reshape(1, 1, 3, 4)
    points = torch.tensor([[[16 * 1.5, 16 * 0.25], [-100.0, -100.0], [1000.0, 16 * 2.0], [16 * 3.0, 16 * 1.0]]], dtype=torch.float64)
    indices, weights = bilinear_neighbours(points, 16.0, 0.0, 3, 4)
    assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones(4, dtype=torch.float64))
    assert ((features.flatten()[indices] * weights).sum(-1)).tolist() == pytest.approx([4 * 0.25 + 1.5, 0.0, 11.0, 7.0])
    torch.manual_seed(0)
    for height, width, stride, offset in ((13, 13, 16, 15.5), (6, 6, 32, 31.5), (1, 5, 8, 3.5), (4, 1, 8, 3.5), (1, 1, 32, 0)):
        maps = torch.randn(3, 7, height, width, dtype=torch.float64, requires_grad=True)
        points = torch.rand(3, 50, 2, dtype=torch.float64) * 260 - 20
        upstream = torch.randn(3, 50, 7, dtype=torch.float64)
        results = []
        for sample in (lambda: sample_at_points(maps, points, stride, offset),
                       lambda: sample_channels_last(maps.permute(0, 2, 3, 1), points, stride, offset)):
            values = sample()
            results.append((values, torch.autograd.grad((values * upstream).sum(), maps)[0]))
        torch.testing.assert_close(results[1], results[0])


def test_hypercolumn_concatenates_taps_in_order():
    network = AlexNet()
    taps = ["conv1", "pool1", "conv3", "pool5", "fc7"]
    activations = network(torch.randn(2, 3, 224, 224), taps)
    columns = sparse_hypercolumn(activations, torch.rand(2, 9, 2) * 223, layer_geometry(), taps)
    assert columns.shape == (2, 9, 96 + 96 + 384 + 256 + 4096)
    torch.testing.assert_close(columns[:, :, -4096:], activations["fc7"].flatten(1).unsqueeze(1).expand(-1, 9, -1))


def test_head_at_points_equals_head_on_the_concatenated_hypercolumn():
    torch.manual_seed(0)
    taps = ["conv1", "pool1", "conv3", "pool5", "fc7"]
    activations = AlexNet().double()(torch.randn(2, 3, 224, 224, dtype=torch.float64), taps)
    head = HypercolumnMLP(96 + 96 + 384 + 256 + 4096, 16, 4).double()
    points = torch.rand(2, 7, 2, dtype=torch.float64) * 223
    expected = head(sparse_hypercolumn(activations, points, layer_geometry(), taps))
    torch.testing.assert_close(head.forward_at_points(activations, points, layer_geometry(), taps), expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_each_tap_sampled_or_projected_first_gives_the_head_and_its_gradients_on_the_hypercolumn(memory_format):
    """At 224 px and N = 512 conv1, pool1 sample first and conv3, pool5, fc7 project first; both give the same values
    and the same gradients (to the activations and to the weights) as the head on the concatenated hypercolumn, from
    a backbone in either memory format (channels last: the taps are sampled as views, without a copy)."""
    torch.manual_seed(0)
    taps = ["conv1", "pool1", "conv3", "pool5", "fc7"]
    network = AlexNet().double().to(memory_format=memory_format)
    image = torch.randn(2, 3, 224, 224, dtype=torch.float64).contiguous(memory_format=memory_format)
    activations = {t: a.detach().requires_grad_() for t, a in network(image, taps).items()}
    assert activations["conv1"].is_contiguous(memory_format=memory_format)
    head = HypercolumnMLP(96 + 96 + 384 + 256 + 4096, 16, 4).double()
    assert [project_first(activations[t].shape, 512, 16) for t in taps] == [False, False, True, True, True]
    points = torch.rand(2, 512, 2, dtype=torch.float64) * 223
    results = []
    for forward in (lambda: head(sparse_hypercolumn(activations, points, layer_geometry(), taps)),
                    lambda: head.forward_at_points(activations, points, layer_geometry(), taps)):
        output = forward()
        gradients = torch.autograd.grad((output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).view_as(output)).sum(),
                                        [*activations.values(), *head.parameters()])
        results.append((output, gradients))
    torch.testing.assert_close(results[1][0], results[0][0])
    for actual, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fully_connected_layers_compute_their_convolution(memory_format):
    """fc6/fc7 run as a matrix product where their input is one kernel in size (224 px) and slide where it is larger:
    both give F.conv2d's values and gradients, in either memory format of weights and inputs."""
    torch.manual_seed(0)
    network = AlexNet().double().to(memory_format=memory_format)
    for name, size in (("fc6", 6), ("fc6", 8), ("fc7", 1), ("fc7", 3)):
        conv = network.conv(name)
        inputs = torch.randn(3, conv.in_channels, size, size, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
        upstream = torch.randn(3, conv.out_channels, size - conv.kernel_size[0] + 1, size - conv.kernel_size[0] + 1, dtype=torch.float64)
        results = []
        for forward in (conv, lambda x: torch.nn.functional.conv2d(x, conv.weight, conv.bias)):
            output = forward(inputs)
            results.append((output, torch.autograd.grad((output * upstream).sum(), [inputs, conv.weight, conv.bias])))
        torch.testing.assert_close(results[0], results[1], msg=f"{name} at {size} x {size}")


@pytest.mark.parametrize("size, taps", [
    ((40, 36), ["conv1", "pool1", "conv3", "conv4"]),
    ((200, 196), ["conv1", "pool1", "conv3", "conv4", "pool5", "fc6", "fc7"]),  # conv3/4 and fc6/7 share a projected map
])
def test_dense_output_equals_the_head_on_the_hypercolumn_at_every_pixel(size, taps):
    torch.manual_seed(0)
    network = AlexNet().double()
    head = HypercolumnMLP(sum(network.channels[t] for t in taps), 8, 3).double()
    activations = network(torch.randn(2, 3, *size, dtype=torch.float64), taps)
    dense = head.forward_dense(activations, layer_geometry(), taps, size, chunk=1000)
    height, width = size
    assert dense.shape == (2, 3, height, width)
    xs, ys = torch.randint(0, width, (300,)), torch.randint(0, height, (300,))
    xs[:2], ys[:2] = torch.tensor([0, width - 1]), torch.tensor([0, height - 1])  # two corners
    points = torch.stack([xs, ys], -1).double().expand(2, -1, -1)
    expected = head(sparse_hypercolumn(activations, points, layer_geometry(), taps))
    torch.testing.assert_close(dense[:, :, ys, xs].transpose(1, 2), expected)


@pytest.fixture(scope="module")
def trained_like_network() -> AlexNet:
    """A BN network whose running statistics are far from (0, 1), as after training."""
    torch.manual_seed(0)
    network = AlexNet(batch_norm=True)
    network.train()
    with torch.no_grad():
        for _ in range(2):
            network(torch.randn(2, 3, 224, 224) * 2 + 0.5, LAYERS)
    return network.eval()


def test_folded_network_equals_eval_mode_bn_network(trained_like_network):
    network = trained_like_network
    folded = fold_batch_norm(network)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    image = torch.randn(2, 3, 224, 224)
    expected, actual = network(image, LAYERS), folded(image, LAYERS)
    for layer in LAYERS:
        scale = expected[layer].abs().max()
        assert (actual[layer] - expected[layer]).abs().max() <= 1e-4 * scale, layer


def test_backbone_file_round_trip(tmp_path, trained_like_network):
    network = trained_like_network
    path = save_backbone(network, tmp_path / "backbone.pt", source={"checkpoint": "x"})
    loaded = load_backbone(path)
    assert not loaded.training and not loaded.batch_norm
    image = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded(image)["fc7"], fold_batch_norm(network)(image)["fc7"])


def test_random_backbone_and_bad_files(tmp_path):
    random_network = load_backbone(None)
    assert isinstance(random_network, AlexNet) and not random_network.batch_norm and not random_network.training
    with pytest.raises(FileNotFoundError, match="crossflow export"):
        load_backbone(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a crossflow backbone"):
        load_backbone(tmp_path / "other.pt")


def test_fold_does_not_touch_the_source_network(trained_like_network):
    network = trained_like_network
    before = copy.deepcopy(network.state_dict())
    fold_batch_norm(network)
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key])
