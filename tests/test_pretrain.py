"""Pretraining data and the `fedtune pretrain` loop (tiny model, a few images)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.cli import main
from fedtune.errors import ConfigError
from fedtune.pretrain import TEXTURES, PretrainConfig, make_contours, pretrain_sets
from fedtune.typedconfig import from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_contours_are_seeded_labelled_and_class_shaped():
    a, b = make_contours(48, 16, seed=3, classes=6), make_contours(48, 16, seed=3, classes=6)
    assert torch.equal(a.images, b.images) and all(torch.equal(a.labels[t], b.labels[t]) for t in a.tasks)
    assert not torch.equal(a.images, make_contours(48, 16, seed=4, classes=6).images)
    assert a.images.shape == (48, 3, 16, 16) and a.num_classes == {"contour": 6, "texture": len(TEXTURES)}
    assert a.images.min() >= -1.0 and a.images.max() <= 1.0
    assert set(a.labels["contour"].tolist()) <= set(range(6)) and set(a.labels["texture"].tolist()) <= set(range(len(TEXTURES)))
    # a class is a shape: silhouettes of one class overlap more than those of different classes
    s = make_contours(400, 32, seed=0, classes=4, channels=1)
    solid = s.labels["texture"] == TEXTURES.index("solid")
    masks = (s.images[solid, 0] > -0.6).flatten(1).float()
    y = s.labels["contour"][solid]
    iou = (masks @ masks.T) / (masks.sum(1, keepdim=True) + masks.sum(1) - masks @ masks.T)
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(len(y), dtype=torch.bool)
    assert iou[same & off_diag].mean() > iou[~same].mean() + 0.05


def test_contour_classes_are_the_same_shapes_under_every_seed():
    # the classes are a formula of (class count), not of the seed: each class's mean silhouette
    # under one seed is closest to the same class's under another
    def mean_masks(seed):
        s = make_contours(600, 32, seed=seed, classes=4, channels=1)
        masks = (s.images[:, 0] > -0.6).float()
        return torch.stack([masks[s.labels["contour"] == c].mean(0).flatten() for c in range(4)])

    a, b = mean_masks(1), mean_masks(2)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])
    assert corr.argmax(1).tolist() == [0, 1, 2, 3]


def test_pretrain_config_rejects_bad_counts():
    with pytest.raises(ConfigError, match="contours"):
        from_dict(PretrainConfig, {"glyphs": 0, "contours": -1}).validate()
    with pytest.raises(ConfigError, match="contour_classes"):
        from_dict(PretrainConfig, {"contours": 10, "contour_classes": 1}).validate()
    plain = from_dict(PretrainConfig, {})
    assert plain.key() == from_dict(PretrainConfig, {"contour_classes": 99}).key()  # unused fields do not change the cache key
    assert plain.key() != from_dict(PretrainConfig, {"contours": 10}).key()


def test_pretrain_on_glyphs_and_contours_writes_a_loadable_checkpoint(tmp_path, capsys):
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(
        "model: {name: vit_tiny_patch16_224, img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}\n"
        "glyphs: 32\ncontours: 32\ncontour_classes: 4\nepochs: 1\nbatch_size: 16\n"
    )
    out = tmp_path / "w.safetensors"
    (tmp_path / "w.partial.safetensors").write_bytes(b"an interrupted run's checkpoint")
    with pytest.warns(UserWarning, match="interrupted run's checkpoint"):
        assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    kept = list(tmp_path.glob("w.partial-*.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"an interrupted run's checkpoint", "kept, not overwritten"
    report = json.loads(capsys.readouterr().out)
    assert set(report["held_out_accuracy"]) == {"glyph", "contour", "texture"}
    from fedtune.model import read_state

    state, meta = read_state(out)
    assert json.loads(meta["num_classes"]) == {"glyph": 36, "contour": 4, "texture": len(TEXTURES)}
    assert np.isfinite(state["heads.contour.weight"].numpy()).all()
    sets = pretrain_sets(from_dict(PretrainConfig, {"glyphs": 0, "contours": 4, "model": {"img_size": 16}}))
    assert [s.tasks for s in sets] == [["contour", "texture"]]
    # the file is kept for its own config only: another seed would score it on its training glyphs
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert main(["pretrain", "--config", str(cfg), "--set", "seed=5", "--out", str(out), "--no-progress"]) == 2
    assert "holds a pretraining of another config (differs in seed)" in capsys.readouterr().err
    moved = from_dict(PretrainConfig, {"init_from": str(out)})
    before = moved.key()
    out.write_bytes(out.read_bytes() + b" ")
    assert moved.key() != before, "the cache key follows the init_from file's contents"


def test_readmes_stage_two_command_matches_the_shipped_file(tmp_path, monkeypatch):
    """The shipped glyph backbone predates the silhouettes' keys: README's command that made it
    is its config still (not "another config"), while a real change, or another init_from
    file's contents where the file records them, is named."""
    from fedtune.cli import _load
    from fedtune.model import checkpoint_meta, read_state
    from fedtune.pretrain import made_by_another
    from fedtune.weights import ASSETS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pre").mkdir(parents=True)
    (tmp_path / "runs" / "pre" / "stage1.safetensors").write_bytes(b"stage 1")
    readme = ["init_from=runs/pre/stage1.safetensors", "scan_fraction=0.7", "epochs=6", "lr=5e-4"]
    _, raw = read_state(ASSETS / "vit_tiny_p4_32_pretrained.safetensors")
    meta = checkpoint_meta(raw)
    assert "contours" not in meta["pretrain"]
    assert made_by_another(meta, _load(PretrainConfig, None, readme)) == []
    assert made_by_another(meta, _load(PretrainConfig, None, [*readme, "epochs=5"])) == ["epochs"]
    cfg = _load(PretrainConfig, None, readme)
    recorded = {**meta, "pretrain_key": cfg.key()}
    assert made_by_another(recorded, cfg) == []
    (tmp_path / "runs" / "pre" / "stage1.safetensors").write_bytes(b"another stage 1")
    assert made_by_another(recorded, _load(PretrainConfig, None, readme)) == ["init_from (its contents)"]


def test_pretrain_refuses_what_it_could_not_read_back_or_train(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "w.pt"), "--no-progress"]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    for bad in ("lr=0", "lr=-1e-3", "weight_decay=-0.1"):
        assert main(["pretrain", "--set", bad, "--out", str(tmp_path / "w.safetensors"), "--no-progress"]) == 2
        assert "lr/weight_decay" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_shipped_asset_is_found_by_name_and_a_wrong_name_is_a_clear_error():
    from fedtune.model import ModelConfig
    from fedtune.weights import ASSETS, resolve_pretrained

    got = resolve_pretrained(ModelConfig(pretrained="asset:vit_tiny_p4_32_contours.safetensors"))
    assert got.pretrained == str(ASSETS / "vit_tiny_p4_32_contours.safetensors")
    for bad in ("asset:nope.safetensors", "asset:", "asset:../assets/vit_tiny_p4_32_contours.safetensors"):
        with pytest.raises(ConfigError, match="no shipped asset.*vit_tiny_p4_32_pretrained.safetensors"):
            resolve_pretrained(ModelConfig(pretrained=bad))


def test_the_fmnist_benches_differ_as_their_headers_say():
    from fedtune.bench import BenchConfig
    from fedtune.cli import _load

    def load(name):
        cfg = _load(BenchConfig, str(ROOT / "simulations" / name), [])
        cfg.validate()
        return cfg

    main, shipped, contours = load("bench_fmnist.yaml"), load("bench_fmnist_shipped.yaml"), load("bench_fmnist_contours.yaml")
    assert main.model.pretrained == contours.model.pretrained == "asset:vit_tiny_p4_32_contours.safetensors"
    assert shipped.model.pretrained == "default"
    # the glyph backbone's bench keeps ALaST's earlier setting; the contours pilot changes only the backbone
    assert (shipped.method.alast.mean_budget, shipped.method.alast.rate) == (0.2, 0.1)
    assert (main.method.alast.mean_budget, main.method.alast.rate) == (0.25, 0.3)
    assert main.variants["alast_tight"]["alast"]["mean_budget"] == 0.2
    assert (contours.data, contours.train, contours.method, contours.seeds) == (shipped.data, shipped.train, shipped.method, shipped.seeds)
    assert (main.data, main.train, main.seeds, main.budgets) == (shipped.data, shipped.train, shipped.seeds, shipped.budgets)


def test_every_shipped_asset_is_verified_against_a_checksum(tmp_path, monkeypatch):
    """Each asset carries its tensors' checksum or is listed with it; a damaged copy is refused."""
    from safetensors.torch import load_file, save_file

    from fedtune.errors import CheckpointError
    from fedtune.model import UNSTAMPED_ASSETS, read_state
    from fedtune.weights import ASSETS

    for path in sorted(ASSETS.glob("*.safetensors")):
        _, raw = read_state(path)  # verified
        assert "sha256" in raw or path.name in UNSTAMPED_ASSETS, path.name
    damaged = tmp_path / "assets" / "vit_tiny_p4_32_pretrained.safetensors"
    damaged.parent.mkdir()
    state = load_file(str(ASSETS / damaged.name))
    first = sorted(state)[0]
    state[first] = state[first] + 1e-3
    save_file(state, str(damaged), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_state(damaged)
    # the cache's copy, where an app bundle without binary files finds the backbone, is checked too
    cached = tmp_path / "cache" / "pretrained" / damaged.name
    cached.parent.mkdir(parents=True)
    save_file(state, str(cached), metadata={"format": "pt"})
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_state(cached)
