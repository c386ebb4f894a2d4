"""The paper's reference backbones: torchvision's ImageNet AlexNet ("Class Labels": its architecture and
weights file) and the random network rescaled by Kraehenbuehl et al.'s procedure ("Random-rescaled"),
each accepted by every eval."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from crossflow.cli import main as crossflow
from crossflow.errors import InvalidInputError
from crossflow.models import LAYERS, AlexNet, load_backbone, sample_at_points, save_backbone
from crossflow.models import rescale
from crossflow.models.alexnet import CONV_LAYERS
from crossflow.models.backbone import BACKBONE_FORMAT, file_sha256
from evals import common
from evals.common import backbone_identity, training_images
from evals.linear_probe import ImageNetData, LinearProbe
from evals.voc07_cls import VOC07Classification, VOC07ClassificationData

from .test_configs import tiny_world  # noqa: F401 (the synthetic VOC and ImageFolder worlds, a fixture)
from .conftest import REPO

DEMO_CONFIGS = sorted((REPO / "configs" / "eval").glob("demo_*.yaml"))
# Where each of our taps is in torchvision's AlexNet (the module whose output it is).
TORCHVISION_TAPS = {
    "conv1": "features.1", "pool1": "features.2", "conv2": "features.4", "pool2": "features.5", "conv3": "features.7",
    "conv4": "features.9", "conv5": "features.11", "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5",
}


@pytest.fixture(scope="module")
def torchvision_alexnet(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A randomly initialised torchvision AlexNet (eval mode) and its state_dict saved as torchvision's weights files are."""
    torch.manual_seed(0)
    network = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "alexnet-random.pth"
    torch.save(network.state_dict(), path)
    return path, network


def smooth_images(count: int, height: int, width: int) -> torch.Tensor:
    """``[count, 3, H, W]`` image-like inputs: upsampled noise plus a little pixel noise."""
    coarse = torch.randn(count, 3, height // 8, width // 8)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) + 0.3 * torch.randn(count, 3, height, width)


def pre_activations(network: AlexNet, images: list[torch.Tensor], layers=CONV_LAYERS) -> dict[str, torch.Tensor]:
    """``{layer: [C, N]}``: each conv layer's output before its ReLU, every position of every image."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        network.conv(name).register_forward_hook(lambda m, i, o, name=name: captured[name].append(o.clone()))  # the ReLU is in place
        for name in layers
    ]
    with torch.no_grad():
        for image in images:
            network(image[None], (layers[-1],))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat([z.transpose(0, 1).flatten(1) for z in maps], dim=1) for name, maps in captured.items()}


# ---------------------------------------------------------------------------------------------- torchvision


def test_torchvision_weights_give_torchvision_activations(torchvision_alexnet):
    path, reference = torchvision_alexnet
    network = load_backbone(path)
    assert network.arch == "torchvision" and not network.training
    modules = dict(reference.named_modules())
    captured = {}
    hooks = [modules[m].register_forward_hook(lambda mod, i, o, tap=tap: captured.__setitem__(tap, o.clone())) for tap, m in TORCHVISION_TAPS.items()]
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference(images)
        ours = network(images, LAYERS)
    for hook in hooks:
        hook.remove()
    for tap in LAYERS:
        expected = captured[tap].flatten(1)
        torch.testing.assert_close(ours[tap].flatten(1), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=tap)


def test_torchvision_arch_shapes_and_minimum_input():
    network = AlexNet(arch="torchvision").eval()
    with torch.no_grad():
        shapes = {k: tuple(v.shape[1:]) for k, v in network(torch.randn(1, 3, 224, 224), LAYERS).items()}
        assert shapes == {
            "conv1": (64, 55, 55), "pool1": (64, 27, 27), "conv2": (192, 27, 27), "pool2": (192, 13, 13),
            "conv3": (384, 13, 13), "conv4": (256, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
            "fc6": (4096, 1, 1), "fc7": (4096, 1, 1),
        }
        assert network.min_input_size() == 223 and network(torch.zeros(1, 3, 223, 223))["fc7"].shape[-2:] == (1, 1)
        with pytest.raises(RuntimeError):
            network(torch.zeros(1, 3, 222, 222))
    assert network.channels == {k: v[0] for k, v in shapes.items()}


def test_torchvision_arch_sampling_at_feature_centres_is_exact():
    network = AlexNet(arch="torchvision").double()
    activations = network(torch.randn(1, 3, 224, 224, dtype=torch.float64), LAYERS)
    for layer, features in activations.items():
        stride, offset = network.geometry[layer]
        h, w = features.shape[-2:]
        jy, jx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        points = torch.stack([stride * jx + offset, stride * jy + offset], -1).reshape(1, -1, 2).double()
        sampled = sample_at_points(features, points, stride, offset)
        torch.testing.assert_close(sampled, features.flatten(2).transpose(1, 2), rtol=0, atol=1e-9, msg=layer)


def test_backbone_files_record_the_arch_and_version_1_files_still_load(tmp_path, torchvision_alexnet):
    torchvision_network = load_backbone(torchvision_alexnet[0])
    loaded = load_backbone(save_backbone(torchvision_network, tmp_path / "torchvision_arch.pt"))
    assert loaded.arch == "torchvision"
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image)["fc7"], torchvision_network(image)["fc7"])
    ours = AlexNet()
    version_1 = {"format": BACKBONE_FORMAT, "format_version": 1, "arch": "alexnet", "config": {"groups": 1}, "source": {}, "state_dict": ours.state_dict()}
    torch.save(version_1, tmp_path / "v1.pt")
    loaded = load_backbone(tmp_path / "v1.pt")
    assert loaded.arch == "crossflow" and torch.equal(loaded.conv("fc7").weight, ours.conv("fc7").weight)


def bad_files(folder: Path, torchvision_state: dict) -> dict[str, Path]:
    """Files that are neither format, and a torchvision-like state_dict with another conv1."""
    wrong_conv1 = dict(torchvision_state, **{"features.0.weight": torch.zeros(96, 3, 11, 11), "features.0.bias": torch.zeros(96)})
    other_keys = {k.replace("features.", "body."): v for k, v in torchvision_state.items()}
    contents = {"other_dict": {"something": 1}, "other_keys": other_keys, "wrong_conv1": wrong_conv1}
    paths = {}
    for name, content in contents.items():
        torch.save(content, folder / f"{name}.pt")
        paths[name] = folder / f"{name}.pt"
    (folder / "text.pt").write_text("not a weights file\n")
    (folder / "truncated.pt").write_bytes(paths["wrong_conv1"].read_bytes()[:4096])
    return {**paths, "text": folder / "text.pt", "truncated": folder / "truncated.pt"}


def test_a_file_of_neither_format_is_a_one_line_error(tmp_path, torchvision_alexnet, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = bad_files(tmp_path, torchvision_alexnet[1].state_dict())
    for name, path in files.items():
        with pytest.raises(InvalidInputError) as error:
            load_backbone(path)
        message = str(error.value)
        assert "\n" not in message and str(path) in message, name
        expected = "features.0.weight has shape (96, 3, 11, 11)" if name == "wrong_conv1" else "nor a torchvision AlexNet state_dict"
        assert expected in message, (name, message)
    config = REPO / "configs" / "eval" / "demo_voc07_cls.yaml"
    assert crossflow(["fit", "--config", str(config), "--model.init_args.backbone", str(files["text"])]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"crossflow fit: error: {files['text']} is not a crossflow backbone")


def test_results_record_the_spec_and_kind(tmp_path, torchvision_alexnet):
    path = torchvision_alexnet[0]
    assert backbone_identity(str(path)) == {"backbone": str(path), "backbone_kind": "torchvision", "backbone_source": {}, "backbone_sha256": file_sha256(path)}
    assert backbone_identity("random-rescaled") == {"backbone": "random-rescaled", "backbone_kind": "random-rescaled", "backbone_source": {}, "backbone_sha256": None}
    crossflow_file = save_backbone(AlexNet(), tmp_path / "ours.pt", source={"objective": "cross_pixel"})
    identity = backbone_identity(str(crossflow_file))
    assert identity["backbone_kind"] == "crossflow" and identity["backbone_source"] == {"objective": "cross_pixel"}


# ---------------------------------------------------------------------------------------------- rescaling


def test_within_layer_rescaling_standardises_every_pre_activation():
    """Algorithm 1's definition, checked in float64. In float32 the rescaled pre-activation of a channel carries the
    rounding error of its sum over the fan-in (up to 9216 terms) divided by that channel's spread on the images; fc6/fc7
    see only 6 positions here, so that spread can be small and the error reached 4e-5 on one CPU and over 1e-4 on
    another. In float64 the same amplification leaves about 1e-12, so 1e-9 holds on any processor and BLAS kernel,
    while a wrong rescaling (e.g. the sample std, off by sqrt(6/5) at fc7 and by 3e-5 at conv1) still fails."""
    torch.manual_seed(0)
    network = AlexNet().double()
    images = [image.double() for image in (*smooth_images(4, 224, 224), *smooth_images(1, 200, 232))]  # two sizes, pooled
    assert rescale.rescale_within_layers(network, images) == list(CONV_LAYERS)
    for name, values in pre_activations(network, images).items():
        zeros, ones = torch.zeros(len(values), dtype=torch.float64), torch.ones(len(values), dtype=torch.float64)
        torch.testing.assert_close(values.mean(1), zeros, rtol=0, atol=1e-9, msg=name)
        torch.testing.assert_close(values.std(1, correction=0), ones, rtol=0, atol=1e-9, msg=name)


def test_layers_no_image_reaches_keep_their_initialisation():
    torch.manual_seed(0)
    network = AlexNet()
    fc6 = network.conv("fc6").weight.clone()
    assert rescale.rescale_within_layers(network, list(smooth_images(2, 128, 128))) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert torch.equal(network.conv("fc6").weight, fc6)


def test_between_layer_rescaling_equalises_change_rates_and_keeps_layers_standardised():
    torch.manual_seed(0)
    network = AlexNet()
    images = list(smooth_images(4, 128, 128))  # small and fast: conv1..conv5 (fc6/fc7 are not reached)
    layers = rescale.rescale_within_layers(network, images)
    spread = lambda rates: max(rates.values()) / min(rates.values())  # noqa: E731
    batches = rescale.batches_by_size(images)
    before = spread(rescale.change_rates(network, batches, layers, torch.Generator().manual_seed(1))[0])
    rescale.rescale_between_layers(network, images, layers, torch.Generator().manual_seed(0), iterations=2)  # 1 suffices
    after = spread(rescale.change_rates(network, batches, layers, torch.Generator().manual_seed(1))[0])
    assert before > 3 and after < 1.5, (before, after)
    for name, values in pre_activations(network, images, layers).items():  # each layer: mean 0, one std for all channels
        std = values.std(1, correction=0)
        assert values.mean(1).abs().max() < 1e-3 * std.mean() and (std / std.mean() - 1).abs().max() < 1e-3, name


def taps_of(network: AlexNet, images: torch.Tensor, layers=CONV_LAYERS[:5]) -> dict[str, torch.Tensor]:
    """Each conv layer's output after its ReLU on ``images [B, 3, H, W]``."""
    with torch.no_grad():
        return network(images, tuple(layers))


def assert_scaled_copies(scaled: dict[str, torch.Tensor], original: dict[str, torch.Tensor], layers) -> None:
    """Each layer's output is one positive factor times the original's, and the factors are not all 1."""
    factors = {name: float(scaled[name].norm() / original[name].norm()) for name in layers}
    for name, factor in factors.items():
        atol = 1e-5 * float(scaled[name].abs().max())
        torch.testing.assert_close(scaled[name], factor * original[name], rtol=1e-4, atol=atol, msg=name)
    assert max(abs(factor - 1) for factor in factors.values()) > 0.1, factors


def test_rebalancing_a_trained_network_scales_each_layer_by_one_factor_and_equalises_change_rates():
    """magic_init on a loaded network (-l FILE -cs): no layer re-initialised, only the between-layer step. ReLU and max
    pooling are positively homogeneous, so each layer's output becomes one positive factor times the old one."""
    torch.manual_seed(0)
    network = AlexNet()
    images = list(smooth_images(4, 128, 128))
    rescale.rescale_within_layers(network, images)  # standardised layers, as a batch-norm-folded export has
    batches = rescale.batches_by_size(images)
    spread = lambda rates: max(rates.values()) / min(rates.values())  # noqa: E731
    layers = list(CONV_LAYERS[:5])  # what 128 px reaches
    before_rates = spread(rescale.change_rates(network, batches, layers, torch.Generator().manual_seed(1))[0])
    before = taps_of(network, batches[0])
    assert rescale.rebalance(network, images) == layers
    after = taps_of(network, batches[0])
    assert_scaled_copies(after, before, layers)
    after_rates = spread(rescale.change_rates(network, batches, layers, torch.Generator().manual_seed(1))[0])
    assert before_rates > 3 and after_rates < 1.5, (before_rates, after_rates)


def test_an_eval_rebalances_a_backbone_file_only_when_asked(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(common, "RESCALE_IMAGES", 4)
    monkeypatch.setattr(rescale, "BETWEEN_LAYER_ITERATIONS", 1)
    torch.manual_seed(0)
    network = AlexNet(batch_norm=True).train()
    with torch.no_grad():
        network(smooth_images(2, 224, 224), ("fc7",))  # every layer ran: nothing for the untrained-layer rule
    path = save_backbone(network, tmp_path / "trained.pt")
    exported = load_backbone(path)
    data = VOC07ClassificationData(str(tiny_world["voc"]), batch_size=2, test_batch_size=2, test_crops=1, num_workers=0)
    fitted = {}
    for rebalanced in (False, True):
        model = VOC07Classification(backbone=str(path), rebalance=rebalanced, lr=0.0)  # lr 0: the weights are the start's
        L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(model, datamodule=data)
        fitted[rebalanced] = model.network
    images = torch.stack(training_images(data.train_set, 4, common.RESCALE_SEED))
    original, plain, rebalanced = (taps_of(net, images, CONV_LAYERS) for net in (exported, fitted[False], fitted[True]))
    for name in CONV_LAYERS:
        torch.testing.assert_close(plain[name], original[name], msg=name)
    assert_scaled_copies(rebalanced, original, CONV_LAYERS)


def test_fit_rescales_on_the_evals_training_images_and_test_keeps_the_fitted_weights(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(common, "RESCALE_IMAGES", 6)
    monkeypatch.setattr(rescale, "BETWEEN_LAYER_ITERATIONS", 1)
    data = ImageNetData(str(tiny_world["imagenet"]), crop_size=128, resize_size=146, batch_size=4, val_batch_size=8, num_workers=0)
    model = LinearProbe(backbone="random-rescaled", num_classes=20)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    images = training_images(data.train_set, 6, common.RESCALE_SEED)  # what the fit drew: 128 px training crops
    assert [tuple(image.shape) for image in images] == [(3, 128, 128)] * 6
    conv_layers = ("conv1", "conv2", "conv3", "conv4", "conv5")  # fc6/fc7 need 193 px: unused by the probe, left as drawn
    for name, values in pre_activations(model.backbone, images, conv_layers).items():  # the frozen backbone is the rescaled one
        std = values.std(1, correction=0)
        assert values.mean(1).abs().max() < 1e-3 * std.mean() and (std / std.mean() - 1).abs().max() < 1e-3, name
    fitted = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer.test(model, datamodule=data)
    assert all(torch.equal(v, fitted[k]) for k, v in model.backbone.state_dict().items())
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["backbone"] == "random-rescaled" and record["backbone_kind"] == "random-rescaled"


def test_layers_a_pretraining_never_ran_are_recorded_and_rescaled_by_the_evals_like_random_rescaled(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(common, "RESCALE_IMAGES", 4)
    network = AlexNet(batch_norm=True).train()
    with torch.no_grad():
        network(smooth_images(2, 128, 128), ("pool5",))  # a 128 px pretraining step: its BN of conv1..conv5 ran, fc6/fc7's not
    path = save_backbone(network, tmp_path / "demo.pt")
    assert torch.load(path, weights_only=True)["untrained_layers"] == ["fc6", "fc7"]
    network(smooth_images(2, 224, 224), ("fc7",))
    assert torch.load(save_backbone(network, tmp_path / "full.pt"), weights_only=True)["untrained_layers"] == []

    exported = load_backbone(path).state_dict()
    data = ImageNetData(str(tiny_world["imagenet"]), crop_size=224, resize_size=256, batch_size=4, val_batch_size=8, num_workers=0)
    model = LinearProbe(backbone=str(path), num_classes=20)
    L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(model, datamodule=data)
    fitted = model.backbone.state_dict()
    for name in CONV_LAYERS[:5]:  # the pretrained layers are the file's
        assert torch.equal(fitted[f"layers.{name}.conv.weight"], exported[f"layers.{name}.conv.weight"]), name
    images = training_images(data.train_set, 4, common.RESCALE_SEED)
    for name, values in pre_activations(model.backbone, images, ("fc6", "fc7")).items():  # Algorithm 1 on the eval's images
        assert not torch.equal(fitted[f"layers.{name}.conv.weight"], exported[f"layers.{name}.conv.weight"]), name
        std = values.std(1, correction=0)
        assert values.mean(1).abs().max() < 1e-3 * std.mean() and (std / std.mean() - 1).abs().max() < 1e-3, name


def test_training_images_are_fixed_by_the_seed_and_leave_the_global_rng_alone():
    dataset = [(torch.rand(3, 4, 4) * torch.rand(()), i) for i in range(5)]

    class Augmented(list):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return image + torch.rand(()), label

    state = torch.get_rng_state()
    first, second = training_images(Augmented(dataset), 7, 3), training_images(Augmented(dataset), 7, 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 7 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], training_images(Augmented(dataset), 7, 4)[0])


# ---------------------------------------------------------------------------------------------- every eval


@pytest.mark.parametrize("spec", ["random-rescaled", "torchvision"])
@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: p.stem)
def test_every_eval_fits_its_demo_config_with_both_reference_backbones(config, spec, tiny_world, torchvision_alexnet, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "RESCALE_IMAGES", 4)
    monkeypatch.setattr(rescale, "BETWEEN_LAYER_IMAGES", 2)
    monkeypatch.setattr(rescale, "BETWEEN_LAYER_ITERATIONS", 1)
    backbone = str(torchvision_alexnet[0]) if spec == "torchvision" else spec
    root = tiny_world["imagenet" if "linear" in config.stem else "voc"]
    args = ["fit", "--config", str(config), "--model.init_args.backbone", backbone, "--data.init_args.root", str(root),
            "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--data.init_args.num_workers", "0"]
    assert crossflow(args) == 0


# ---------------------------------------------------------------------------------------------- provenance


def test_results_name_the_backbone_that_was_fine_tuned_even_when_its_file_was_replaced_since(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    backbone, other = tmp_path / "backbone.pt", tmp_path / "other.pt"
    for seed, path in ((0, backbone), (1, other)):
        torch.manual_seed(seed)
        save_backbone(AlexNet(), path)
    fine_tuned = file_sha256(backbone)
    config = REPO / "configs" / "eval" / "demo_in1k_linear.yaml"
    args = ["--config", str(config), "--model.init_args.backbone", str(backbone), "--data.init_args.root", str(tiny_world["imagenet"]),
            "--trainer.accelerator", "cpu", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path / "run")]
    assert crossflow(["fit", *args, "--trainer.max_steps", "1"]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)[common.PROVENANCE_KEY]["backbone_sha256"] == fine_tuned

    other.replace(backbone)  # re-exported to the same path after the fine-tuning
    with pytest.warns(UserWarning, match=f"{backbone} is not the backbone this checkpoint was fine-tuned from"):
        assert crossflow(["test", *args, "--ckpt_path", str(checkpoint)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["backbone"], results["backbone_kind"], results["backbone_sha256"]) == (str(backbone), "crossflow", fine_tuned)
    assert file_sha256(backbone) != fine_tuned
