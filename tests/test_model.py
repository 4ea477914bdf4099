"""The region classifier: backbones, weights files, preprocessing, frozen BatchNorm, checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from rcnn.engine.device import select_device
from rcnn.families.rcnn.model import RegionClassifier, build_model, load_checkpoint, preprocess, save_checkpoint
from rcnn.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from rcnn.pipeline.params import ModelParams, Params
from rcnn.utils.errors import RcnnError


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                      ("resnet101", 2048), ("mobilenet_v2", 1280), ("mobilenet_v3_large", 960)])
def test_backbones_give_pooled_features_and_head_logits(name, dim):
    model = RegionClassifier(name, num_classes=3, hidden=16)
    assert model.feature_dim == dim
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)
        assert model.features(x).shape == (2, dim)
        assert model(x).shape == (2, 4)


def test_preprocess_scales_pixels_to_unit_range_before_imagenet_normalisation():
    crops = np.zeros((2, 4, 4, 3), np.uint8)
    crops[0, ..., 0] = 255  # pure red
    x = preprocess(crops, "cpu")
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected_red = torch.stack([(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]])
    torch.testing.assert_close(x[0, :, 0, 0], expected_red)
    torch.testing.assert_close(x[1, :, 2, 3], -mean / std)
    assert x.abs().max() < 3  # the tutorial's 0..255 inputs would be ~1000
    with pytest.raises(ValueError):
        preprocess(np.zeros((2, 4, 4, 3), np.float32), "cpu")


def test_classify_features_of_features_equals_forward_in_eval_mode():
    torch.manual_seed(0)
    model = RegionClassifier("resnet18", num_classes=3, hidden=16, dropout=0.5).eval()
    x = torch.randn(4, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(model.classify_features(model.features(x)), model(x), rtol=0, atol=0)


def _random_torchvision(name: str) -> nn.Module:
    torch.manual_seed(1)
    return torchvision.models.get_model(name, weights=None)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_local_weights_load_strictly_whole_or_features_only(name, tmp_path):
    full = _random_torchvision(name).state_dict()
    assert any(k.startswith(("fc.", "classifier.")) for k in full)
    trunk_only = {k: v for k, v in full.items() if not k.startswith(("fc.", "classifier."))}
    torch.save(full, tmp_path / "full.pth")
    torch.save(trunk_only, tmp_path / "trunk.pth")
    for path in (tmp_path / "full.pth", tmp_path / "trunk.pth"):
        backbone, _ = build_backbone(name, str(path))
        loaded = backbone.state_dict()
        assert loaded.keys() == trunk_only.keys()
        for key, value in trunk_only.items():
            assert torch.equal(loaded[key], value), key


def test_mismatching_incomplete_corrupt_or_missing_weights_file_is_an_error(tmp_path):
    torch.save(_random_torchvision("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(RcnnError, match=r"resnet18\.pth.*mobilenet_v2"):
        build_backbone("mobilenet_v2", str(tmp_path / "resnet18.pth"))
    with pytest.raises(RcnnError, match=r"resnet18\.pth.*resnet34"):
        build_backbone("resnet34", str(tmp_path / "resnet18.pth"))
    partial = _random_torchvision("mobilenet_v2").features.state_dict()
    partial = {f"features.{k}": v for k, v in partial.items() if not k.startswith("18.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(RcnnError, match=r"partial\.pth.*mobilenet_v2.*missing"):
        build_backbone("mobilenet_v2", str(tmp_path / "partial.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a torch file")
    with pytest.raises(RcnnError, match=r"corrupt\.pth.*resnet18"):
        build_backbone("resnet18", str(tmp_path / "corrupt.pth"))
    with pytest.raises(RcnnError, match=r"nowhere\.pth not found.*resnet18"):
        build_backbone("resnet18", str(tmp_path / "nowhere.pth"))


def test_imagenet_weights_unreachable_asks_for_a_local_file(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RcnnError, match=r"resnet50.*local \.pth path"):
        build_backbone("resnet50", "imagenet")


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _one_step(model: RegionClassifier, size: int = 48) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()


def test_frozen_backbone_stays_in_eval_mode_and_never_changes():
    torch.manual_seed(0)
    model = RegionClassifier("resnet18", num_classes=3, hidden=16)
    before = _bn_state(model.backbone)
    head_before = _bn_state(model.head)
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    _one_step(model)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running_mean/var
    assert not all(torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def _changed_after_one_step(model: RegionClassifier) -> set[str]:
    before = _bn_state(model.backbone)
    _one_step(model)
    after = model.backbone.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_pretrained_backbone_fine_tunes_its_last_units_and_keeps_batchnorm_statistics(tmp_path):
    torch.save(_random_torchvision("resnet18").state_dict(), tmp_path / "resnet18.pth")
    torch.manual_seed(0)
    model = RegionClassifier("resnet18", num_classes=3, weights=str(tmp_path / "resnet18.pth"), hidden=16,
                             trainable_layers=1)
    assert not model.frozen
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())  # BatchNorm normalises with its statistics
    assert all(p.requires_grad for p in model.backbone.layer4.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer3.parameters())
    changed = _changed_after_one_step(model)
    assert changed and all(k.startswith("layer4.") for k in changed)
    assert "layer4.0.bn1.weight" in changed and "layer4.0.conv1.weight" in changed
    assert not any("running_" in k for k in changed)


def test_random_backbone_learns_batchnorm_statistics_in_its_trainable_units_only():
    torch.manual_seed(0)
    model = RegionClassifier("resnet18", num_classes=3, hidden=16, trainable_layers=1)  # weights "none"
    model.train()
    assert model.backbone.layer4.training and all(m.training for m in model.backbone.layer4.modules())
    assert not any(m.training for m in model.backbone.layer3.modules())
    assert not model.backbone.bn1.training
    changed = _changed_after_one_step(model)
    assert changed and all(k.startswith("layer4.") for k in changed)
    assert "layer4.0.bn1.running_mean" in changed
    model.eval()
    assert not any(m.training for m in model.modules())


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    params = Params(classes=["car", "dog"], model=ModelParams(backbone="mobilenet_v3_large", weights="none",
                                                              hidden=8))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_model(params), build_model(params)
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = build_model(dataclasses.replace(params, seed=1))
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def _meta() -> dict:
    return {"classes": ["car", "dog", "person"], "crop_size": 48, "context": 4, "params": {"seed": 0, "x": [1, 2]},
            "weights": "none", "bbox_regressor": {"weight": torch.ones(4, 8, 4), "bias": torch.zeros(4, 4)}}


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = RegionClassifier("mobilenet_v2", num_classes=3, hidden=16, dropout=0.3, trainable_layers=2).eval()
    save_checkpoint(tmp_path / "m" / "model.pt", model, _meta())
    loaded, meta = load_checkpoint(tmp_path / "m" / "model.pt", "cpu")
    assert not loaded.training and loaded.trainable_layers == 2 and loaded.backbone_name == "mobilenet_v2"
    assert meta["classes"] == ["car", "dog", "person"] and meta["crop_size"] == 48 and meta["context"] == 4
    assert meta["backbone"] == "mobilenet_v2" and meta["params"] == {"seed": 0, "x": [1, 2]}
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    assert torch.equal(meta["bbox_regressor"]["weight"], torch.ones(4, 8, 4))
    x = preprocess(np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8), "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.joinpath("m").iterdir()] == ["model.pt"]  # no temp files left


def test_corrupt_foreign_or_missing_checkpoint_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(RcnnError, match=r"broken\.pt is corrupt"):
        load_checkpoint(tmp_path / "broken.pt")
    model = RegionClassifier("resnet18", num_classes=3, hidden=16)
    save_checkpoint(tmp_path / "good.pt", model, _meta())
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(RcnnError, match=r"truncated\.pt"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(RcnnError, match=r"foreign\.pt is not an rcnn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(RcnnError, match=r"absent\.pt not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RcnnError, match="cuda"):
            select_device("cuda")
