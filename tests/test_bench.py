"""`fedtune bench` writes bench.json/bench.md with every method and its ratios (tiny model)."""

import json

from fedtune.cli import main


def test_bench_writes_json_and_table(tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        """
model: {name: vit_tiny_patch16_224, img_size: 16, patch_size: 4, depth: 4, embed_dim: 32, num_heads: 2, pretrained: null}
data: {name: digits, img_size: 16, max_train: 64, max_test: 32}
train: {epochs: 1, batch_size: 16, flops_every: 2, head_fit: after}
method: {alast: {memory_fraction: null, k: 2}}
seeds: [0]
"""
    )
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0  # with progress bars, the default
    report = json.loads((out / "bench.json").read_text())
    assert report["test_size"] == 32
    for name in ("full", "head", "bsr", "alast", "sherl", "alast+lora"):
        m = report["methods"][name]
        for key in ("step_time_s", "train_flops_per_step", "activation_bytes", "trainable_params", "test_accuracy"):
            assert key in m, (name, key)
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["train_flops_per_step"] > 0
        assert m["head_fit_s"] > 0 and m["train_flops_total"] > m["train_flops_per_step"] * m["runs"][0]["steps"], "the head fit's compute is counted"
    full, bsr = report["methods"]["full"], report["methods"]["bsr"]
    assert bsr["train_flops_per_step"] < full["train_flops_per_step"]
    assert bsr["activation_bytes"] < full["activation_bytes"]
    assert report["methods"]["full"]["ratios_vs_full"]["train_flops"] == 1.0
    assert "| alast+lora |" in (out / "bench.md").read_text()


def test_bench_rejects_unknown_method(tmp_path, capsys):
    assert main(["bench", "--methods", "full,warp", "--out", str(tmp_path)]) == 2
    assert "unknown method 'warp'" in capsys.readouterr().err
