"""Export round trip (dense and MoE) on a run folder made without Flower."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedtune.client import ClientRuntime
from fedtune.client_state import ClientState, write_client_state
from fedtune.errors import CheckpointError, ConfigError
from fedtune.export import export_run, load_exported, load_timm, predict, preprocess
from fedtune.federated import global_model, state_to_numpy
from fedtune.model import model_meta, save_checkpoint
from fedtune.typedconfig import to_dict

from .test_federated import tiny_run


def make_run(tmp_path, **over):
    """A run folder as the server writes it: a checkpoint with the run config, one client's state."""
    cfg = tiny_run(**over)
    model = global_model(cfg)
    glob = state_to_numpy(model)
    rt = ClientRuntime(cfg, 0)
    update, _, _, state = rt.fit(glob, ClientState(), server_round=1)
    glob.update(update)
    run = tmp_path / "run"
    meta = model_meta(cfg.model, {t: int(model.heads[t].out_features) for t in model.tasks}, run=to_dict(cfg), round=1, strategy={}, method=cfg.method.name)
    save_checkpoint(run / "checkpoint.safetensors", {k: torch.from_numpy(np.array(v)) for k, v in glob.items()}, meta)
    write_client_state(run / "client_state" / "client-0", state, 1)
    return run, cfg, glob, state


def run_model_and_exported(cfg, glob, out, batch=4):
    """The run's model (its global arrays) in eval mode, random images, and the exported ONNX
    model's logits on them, checked equal to the run model's."""
    from fedtune.federated import load_numpy_state

    module, config = load_exported(out)
    model = global_model(cfg)
    load_numpy_state(model, glob)
    model.eval()
    x = torch.randn(batch, 3, 16, 16)
    logits = torch.from_numpy(module(x))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x, "digit"), atol=1e-5, rtol=0)
    return model, x, logits, config


def client_features(cfg, glob, state, x):
    """A client's runtime holding the global model with its personal state (eval mode), and its features of `x`."""
    rt = ClientRuntime(cfg, 0)
    rt._load(glob, state)
    rt.model.eval()
    with torch.no_grad():
        feats, _ = rt.model.forward_features(x, task="digit")
    return rt, feats


def test_dense_export_round_trip(tmp_path):
    run, cfg, glob, state = make_run(tmp_path)
    out = tmp_path / "export"
    summary = export_run(run, None, out, client=0)
    assert summary["kind"] == "dense"
    module, config = load_exported(out)
    x = torch.randn(4, 3, 16, 16)
    rt, feats = client_features(cfg, glob, state, x)
    with torch.no_grad():
        expected = rt.personal_heads["digit"](feats)
        torch.testing.assert_close(torch.from_numpy(module(x)), expected, atol=1e-5, rtol=0)  # onnxruntime vs the framework
        torch.testing.assert_close(load_timm(out)(x), expected, atol=1e-5, rtol=1e-5)
    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)).save(img)
    rows = predict(out, [img])
    assert rows[0]["class"] in config["classes"]
    with torch.no_grad():
        assert rows[0]["class_id"] == int(module(preprocess([img], config)).argmax())
    assert summary["onnx_max_abs_diff"] <= 1e-5 and summary["inference_flops_per_image"] > 0


def test_a_fedrod_clients_export_adds_its_head_to_the_generic_one(tmp_path):
    """FedRoD predicts with the generic logits plus the personal ones: the export folds the two
    linear heads into one."""
    run, cfg, glob, state = make_run(tmp_path, federation={"num_clients": 4, "rounds": 2, "personalization": "fedrod"})
    export_run(run, None, tmp_path / "export", client=0)
    module, _ = load_exported(tmp_path / "export")
    x = torch.randn(4, 3, 16, 16)
    rt, feats = client_features(cfg, glob, state, x)
    with torch.no_grad():
        expected = rt.model.forward_head(feats, "digit") + rt.personal_heads["digit"](feats)
        assert not torch.allclose(expected, rt.personal_heads["digit"](feats), atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(module(x)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["ditto", "fedper"])
def test_client_export_is_the_clients_own_model(tmp_path, mode):
    """A Ditto client's export is its own whole model; a FedPer client's, the global body with its own head."""
    from fedtune.client_state import personal_model
    from fedtune.federated import load_numpy_state

    run, cfg, glob, state = make_run(tmp_path, federation={"num_clients": 4, "rounds": 2, "personalization": mode})
    export_run(run, None, tmp_path / "export", client=0)
    module, _ = load_exported(tmp_path / "export")
    model = global_model(cfg)
    load_numpy_state(model, glob)
    load_numpy_state(model, personal_model(state.personal) if mode == "ditto" else state.personal)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x, "digit")
        torch.testing.assert_close(torch.from_numpy(module(x)), expected, atol=1e-5, rtol=0)
        load_numpy_state(model, glob)
        assert not torch.allclose(model(x, "digit"), expected, atol=1e-4), "not the global model"
    if mode == "ditto":
        write_client_state(run / "client_state" / "client-1", ClientState(), 1)
        with pytest.raises(ConfigError, match="client 1: personalization ditto, but the client's state holds no model of its own"):
            export_run(run, None, tmp_path / "export1", client=1)


def test_sherl_export_runs_the_trained_consolidator(tmp_path):
    """A SHERL run trains the consolidator (and the head); the export carries it and predicts
    as the run's model does through it, not as the backbone alone would."""
    run, cfg, glob, state = make_run(tmp_path, method={"name": "sherl"})
    assert any(k.startswith("consolidator.") for k in glob)
    summary = export_run(run, None, tmp_path / "export")
    assert summary["kind"] == "sherl" and summary["agreement_with_run_model"] == 1.0
    model, x, logits, _ = run_model_and_exported(cfg, glob, tmp_path / "export")
    with torch.no_grad():
        without = model.heads["digit"](model.vit.forward_head(model.vit.forward_features(x), pre_logits=True))
    assert not torch.allclose(logits, without, atol=1e-4), "the consolidator is in the export"
    with pytest.raises(ConfigError, match="not a plain timm model"):
        load_timm(tmp_path / "export")


@pytest.mark.parametrize("shared", [0, 1])
def test_moe_export_is_smaller_and_predicts_the_same(tmp_path, shared):
    run, cfg, glob, state = make_run(tmp_path, tasks=["digit", "parity"], moe={"num_experts": 4, "top_k": 2, "blocks": [1, 3], "shared_experts": shared}, federation={"num_clients": 4, "client_tasks": [["digit"], ["parity"]]})
    out = tmp_path / "export"
    summary = export_run(run, "digit", out)
    assert summary["kind"] == "moe" and summary["bytes"] < summary["run_model_bytes"]
    _, _, _, config = run_model_and_exported(cfg, glob, out, batch=5)
    assert config["moe"] == {"blocks": [1, 3], "top_k": 2, "router": "per_task", "shared_experts": shared}, "how the kept experts combine"
    assert summary["run_eval_capacity_factor"] is None
    assert summary["onnx_max_abs_diff"] <= 1e-5


def test_export_bad_input(tmp_path):
    run, *_ = make_run(tmp_path)
    saved = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    with pytest.raises(ConfigError, match="holds a run"):
        export_run(run, None, run)
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == saved
    with pytest.raises(ConfigError, match="task 'colour': the run has tasks digit"):
        export_run(run, "colour", tmp_path / "o1")
    with pytest.raises(ConfigError, match="client 2: the run .* has no state"):
        export_run(run, None, tmp_path / "o2", client=2)
    with pytest.raises(ConfigError, match="client 7: the run has clients 0..3"):
        export_run(run, None, tmp_path / "o2", client=7)
    with pytest.raises(CheckpointError, match="no checkpoint.safetensors"):
        export_run(tmp_path, None, tmp_path / "o3")
    babu, *_ = make_run(tmp_path / "babu", federation={"num_clients": 4, "rounds": 2, "personalization": "fedbabu"})
    with pytest.raises(ConfigError, match="client 0: personalization fedbabu .* keeps no personal model; export the global model"):
        export_run(babu, None, tmp_path / "o4", client=0)
    plain, *_ = make_run(tmp_path / "plain", federation={"num_clients": 4, "rounds": 2, "personalization": "none"})
    with pytest.raises(ConfigError, match="client 0: personalization none: a client's model is the global one"):
        export_run(plain, None, tmp_path / "o7", client=0)
    with pytest.raises(ConfigError, match="--experts-per-block: the run .* has no MoE blocks"):
        export_run(run, None, tmp_path / "o8", experts_per_block=1)
    good = export_run(run, None, tmp_path / "o5")
    assert good["kind"] == "dense" and json.loads((tmp_path / "o5" / "export.json").read_text())["client_state_round"] is None
    (tmp_path / "o5" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError, match="model.onnx: checksum mismatch"):
        predict(tmp_path / "o5", [])
    assert good["kind"] == "dense"
    ckpt = run / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        export_run(run, None, tmp_path / "o4")


def test_export_needs_the_checkpoint_not_the_runs_pretrained_file(tmp_path):
    """The checkpoint holds every weight: a run folder exports where its pretrained backbone
    file is gone (moved to another machine, an offline hub); a checkpoint lacking tensors is
    refused, naming them."""
    from safetensors.torch import save_file

    from fedtune.model import read_state
    from tests.test_federated import TINY_RUN

    backbone = tmp_path / "backbone.safetensors"
    model_cfg = {**TINY_RUN["model"], "pretrained": str(backbone)}
    donor = global_model(tiny_run())
    save_file({k: v.contiguous() for k, v in donor.vit.state_dict().items()}, str(backbone))
    run, *_ = make_run(tmp_path, model=model_cfg)
    backbone.unlink()
    assert export_run(run, None, tmp_path / "export")["kind"] == "dense"
    state, raw = read_state(run / "checkpoint.safetensors")
    state.pop("vit.norm.weight")
    save_checkpoint(run / "checkpoint.safetensors", state, raw)
    with pytest.raises(CheckpointError, match=r"lacks 1 of the run model's tensors \(vit.norm.weight\)"):
        export_run(run, None, tmp_path / "export2")


def test_lora_run_sends_adapters_and_exports_merged(tmp_path):
    """LoRA through the federated path: a client sends adapters (and head/norm), never the base
    weights; the export folds the adapters into plain timm layers that predict the same."""
    from fedtune.federated import load_numpy_state

    lora = {"name": "bsr", "bsr": {"train_blocks": [2, 3], "drop_blocks": [1], "keep_ratio": 0.5}, "lora": {"enabled": True, "rank": 2}}
    cfg = tiny_run(method=lora)
    rt = ClientRuntime(cfg, 0)
    update, _, _, _ = rt.fit(state_to_numpy(global_model(cfg)), ClientState(), server_round=1)
    assert any("lora_" in n for n in update)
    assert all("lora_" in n or n.startswith(("vit.norm.", "heads.")) for n in update), sorted(update)
    run, cfg, glob, _ = make_run(tmp_path, method=lora)
    assert any("lora_B" in n and np.abs(v).max() > 0 for n, v in glob.items())  # trained adapters
    out = tmp_path / "export"
    export_run(run, None, out)
    model = global_model(cfg)
    load_numpy_state(model, glob)
    model.eval()
    timm_model = load_timm(out)
    assert not any("lora_" in n for n, _ in timm_model.named_parameters())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), model(x, "digit"), atol=1e-5, rtol=1e-5)


def test_moe_task_export_with_one_expert_per_block_is_the_dense_models_size_and_cost(tmp_path):
    run, cfg, glob, state = make_run(tmp_path, tasks=["digit", "parity"], moe={"num_experts": 4, "top_k": 2, "blocks": [1, 3]},
                                     federation={"num_clients": 4, "client_tasks": [["digit"], ["parity"]]})
    full = export_run(run, "digit", tmp_path / "all")
    one = export_run(run, "digit", tmp_path / "one", experts_per_block=1)
    assert all(len(e) == 1 for e in one["experts"].values())
    assert one["bytes"] == one["dense_bytes"] and one["inference_flops_per_image"] == one["dense_inference_flops_per_image"]
    assert full["inference_flops_per_image"] > full["dense_inference_flops_per_image"], "every kept expert runs on every token"
    assert full["agreement_with_run_model"] == 1.0 and 0.0 <= one["agreement_with_run_model"] <= 1.0
    assert full["test_accuracy"] == full["run_model_test_accuracy"] == one["run_model_test_accuracy"]
    assert full["test_images"] == one["test_images"] > 0 and 0.0 <= one["test_accuracy"] <= 1.0
    assert one["onnx_max_abs_diff"] <= 1e-5
    with pytest.raises(ConfigError, match="experts-per-block"):
        export_run(run, "digit", tmp_path / "zero", experts_per_block=0)


def test_damaged_files_and_hand_edited_exports_are_clear_errors(tmp_path, monkeypatch):
    import yaml

    run, *_ = make_run(tmp_path)
    export_run(run, None, tmp_path / "good")
    # a hand-edited config.yaml
    cfg_path = tmp_path / "good" / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text())
    cfg_path.write_text(yaml.safe_dump({**config, "channels": 2, "classes": "x"}))
    with pytest.raises(CheckpointError, match="classes must be a non-empty list; channels must be 1 or 3 .*edited by hand"):
        predict(tmp_path / "good", [])
    cfg_path.write_text(yaml.safe_dump(config))
    # an image too large to decode safely
    big = tmp_path / "big.png"
    Image.new("L", (20, 20)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses over twice this: a 20x20 image stands in for a 20000x20000 one
    with pytest.raises(ConfigError, match="too large"):
        predict(tmp_path / "good", [big])
    # flipped bytes in the checkpoint's tensor data (the header still parses)
    ckpt = run / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        export_run(run, None, tmp_path / "o6")


def test_onnx_check_scales_with_the_logits(tmp_path, monkeypatch):
    """The ONNX check allows float32 rounding relative to the logits' size (a discriminant
    head's logits reach the hundreds) and still refuses a model that computes something else."""
    import fedtune.export as export

    class Fake:  # what onnxruntime would return: the module's logits plus an error
        def __init__(self, path):
            pass

        def __call__(self, images):
            return module(images).detach().numpy() + error

    monkeypatch.setattr(export, "OnnxModel", Fake)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: None)
    images = torch.randn(4, 3, 8, 8)
    for scale, error, ok in ((500.0, 0.02, True), (1.0, 0.02, False), (500.0, 1.0, False)):
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
        torch.nn.init.constant_(module[1].bias, scale)
        if ok:
            assert export.write_onnx(module, images, images, tmp_path / "m.onnx") == pytest.approx(error, rel=1e-3)
        else:
            with pytest.raises(CheckpointError, match="the largest logit magnitude"):
                export.write_onnx(module, images, images, tmp_path / "m.onnx")
    # a discriminant head's absent class (bias ABSENT_CLASS_BIAS) does not set the scale: an
    # error on the present classes is still caught, and the absent class must stay far below
    from fedtune.heads import ABSENT_CLASS_BIAS

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    with torch.no_grad():
        module[1].bias.copy_(torch.tensor([0.0, 0.0, ABSENT_CLASS_BIAS]))
    error = np.array([0.0, 0.0, 0.0], dtype=np.float32)
    assert export.write_onnx(module, images, images, tmp_path / "m.onnx") == 0.0
    error = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    with pytest.raises(CheckpointError, match="the largest logit magnitude"):
        export.write_onnx(module, images, images, tmp_path / "m.onnx")
    error = np.array([0.0, 0.0, -ABSENT_CLASS_BIAS], dtype=np.float32)
    with pytest.raises(CheckpointError, match="absent class"):
        export.write_onnx(module, images, images, tmp_path / "m.onnx")


def test_a_failed_export_leaves_the_previous_one_as_it_was(tmp_path, monkeypatch):
    import yaml

    import fedtune.export as export

    run, *_ = make_run(tmp_path)
    out = tmp_path / "export"
    export_run(run, None, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def broken(module, example, check, path):
        raise CheckpointError(f"{path}: the ONNX model's logits differ")

    monkeypatch.setattr(export, "write_onnx", broken)
    with pytest.raises(CheckpointError, match="differ") as err:
        export_run(run, None, out, client=0)
    assert str(err.value).startswith(f"{out / 'model.onnx'}:"), "the file named as the user knows it, not the staging folder"
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before, "no staging folder left, no file changed"
    monkeypatch.undo()
    load_exported(out)  # still the complete export it was
    # an export whose config lacks the model's checksum (unfinished, or from before the check) is refused
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["onnx_sha256"]
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="no onnx_sha256"):
        load_exported(out)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_run(run, None, tmp_path / "afile")
    # a staging folder a killed export left behind is removed by the next export
    (out / ".export-killed").mkdir()
    (out / ".export-killed" / "model.onnx").write_bytes(b"half")
    export_run(run, None, out)
    assert not (out / ".export-killed").exists() and sorted(f.name for f in out.iterdir()) == sorted(before)


def test_an_lda_clients_export_is_its_head_on_the_global_models_features(tmp_path):
    """The closed-form personal head is built on, and scored with, the global model's features:
    the export applies it to them."""
    from fedtune.federated import load_numpy_state

    run, cfg, glob, state = make_run(tmp_path, federation={"num_clients": 4, "rounds": 1, "personalization": "lda"})
    rt = ClientRuntime(cfg, 0)
    _, _, kept = rt.evaluate(glob, state, final=True)
    write_client_state(run / "client_state" / "client-0", kept, 1)
    export_run(run, None, tmp_path / "export", client=0)
    module, _ = load_exported(tmp_path / "export")
    model = global_model(cfg)
    load_numpy_state(model, glob)
    model.eval()
    weight, bias = kept.personal["personal_head.digit.weight"], kept.personal["personal_head.digit.bias"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        feats, _ = model.forward_features(x, task="digit")
        expected = feats @ torch.from_numpy(weight).T + torch.from_numpy(bias)
    torch.testing.assert_close(torch.from_numpy(module(x)), expected, atol=1e-4, rtol=1e-5)


def test_a_clients_export_takes_its_state_as_of_the_checkpoints_round(tmp_path):
    """A run stopped after its checkpoint's round may have saved later client states: the
    export pairs the checkpoint with the client's state of that round."""
    run, cfg, glob, state = make_run(tmp_path)
    later = ClientState(personal={k: v + 1.0 if k.startswith("personal_head.") else v for k, v in state.personal.items()}, method=state.method)
    write_client_state(run / "client_state" / "client-0", later, 2)  # the checkpoint is round 1's
    assert export_run(run, None, tmp_path / "export", client=0) and json.loads((tmp_path / "export" / "export.json").read_text())["client_state_round"] == 1
    module, _ = load_exported(tmp_path / "export")
    x = torch.randn(4, 3, 16, 16)
    rt, feats = client_features(cfg, glob, state, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(module(x)), rt.personal_heads["digit"](feats), atol=1e-5, rtol=0)


def test_predict_runs_many_images_in_batches_and_checks_the_classes(tmp_path):
    import yaml

    import fedtune.export as export

    run, *_ = make_run(tmp_path)
    out = tmp_path / "export"
    export_run(run, None, out)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(export.PREDICT_BATCH + 6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(paths[-1])
    rows = predict(out, paths)
    module, config = load_exported(out)
    assert [r["class_id"] for r in rows] == [int(k) for k in module(preprocess(paths, config)).argmax(-1)]
    with pytest.raises(ConfigError, match="no image files"):
        predict(out, [])
    config = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "classes": config["classes"][:3]}))
    with pytest.raises(CheckpointError, match="names 3 classes"):
        predict(out, paths[:1])


@pytest.mark.parametrize(("size", "channels"), [(16, 3), (16, 1), (32, 3)])
def test_predict_preprocesses_images_as_training_loaded_them(tmp_path, size, channels):
    """predict's PIL/numpy path (resize, channels, normalisation) gives what the imagefolder
    loader gave the model in training, within a step of 8-bit rounding (PIL's bilinear resize
    against torch's)."""
    from fedtune.data import load_data
    from fedtune.data.core import DataConfig

    rng = np.random.default_rng(0)
    paths = []
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            paths.append(tmp_path / cls / f"{i}.png")
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(paths[-1])
    split = load_data(DataConfig(name="imagefolder", root=str(tmp_path), img_size=size, channels=channels, test_fraction=0.5))
    loaded = torch.cat([split.train.images, split.test.images])
    config = {"timm_kwargs": {"img_size": size}, "channels": channels, "normalize": {"mean": 0.5, "std": 0.5}}
    pre = torch.from_numpy(preprocess(paths, config))
    assert pre.shape == (6, channels, size, size)
    match = torch.cdist(pre.flatten(1), loaded.flatten(1)).argmin(1)
    assert sorted(match.tolist()) == list(range(6)), "each file matches one loaded image"
    assert float((pre - loaded[match]).abs().max()) < 0.02


def test_export_predict_and_profiles_from_the_command_line(tmp_path, capsys):
    from fedtune.cli import main

    run, *_ = make_run(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--task", "digit", "--client", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '"kind": "dense"' in printed and '"client": 0' in printed and (out / "model.onnx").is_file()
    assert main(["export", str(run), "--out", str(out)]) == 2, "a non-empty --out needs --force"
    assert "is not empty; choose another --out or pass --force" in capsys.readouterr().err
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)).save(img)
    assert main(["predict", str(out), str(img)]) == 0
    image, label, probability = capsys.readouterr().out.strip().split("\t")
    assert image == str(img) and label in load_exported(out)[1]["classes"] and 0.0 < float(probability) <= 1.0
    assert main(["export", str(run), "--out", str(img)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["export", str(run), "--task", "colour", "--out", str(tmp_path / "refused")]) == 2
    assert "task 'colour': the run has tasks digit" in capsys.readouterr().err and not (tmp_path / "refused").exists(), "no empty folder left"
    (tmp_path / "blocker").write_text("")
    assert main(["export", str(run), "--out", str(tmp_path / "blocker" / "sub")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), str(img)]) == 2
    assert "not an exported model" in capsys.readouterr().err
    assert main(["profiles"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("name") and "rpi" in table and "workstation" in table and "auto" in table


def test_a_clients_export_is_of_a_task_it_trains_and_of_its_newest_state(tmp_path):
    """A client's model for a task it never trains would carry the global head, which FedPer's
    clients never train: refused, naming its tasks. A damaged state file of the checkpoint's
    round is an error naming it, not a quiet export of an older round."""
    from .test_multidomain import TASK_DATA

    run, *_ = make_run(tmp_path, task_data=TASK_DATA, federation={"num_clients": 3, "rounds": 2, "personalization": "fedper",
                                                                    "client_tasks": [["digit"], ["shape", "colour"], ["digit", "colour"]]})
    with pytest.raises(ConfigError, match="client 0 does not train task 'shape' \\(its tasks: digit\\)"):
        export_run(run, "shape", tmp_path / "o1", client=0)
    assert export_run(run, None, tmp_path / "o2", client=0)["task"] == "digit"
    state = run / "client_state" / "client-0" / "round-000001.npz"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt client state .*round-000001.npz"):
        export_run(run, None, tmp_path / "o3", client=0)
