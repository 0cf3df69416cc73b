"""What the deployment path checks before it starts a process, and how the apps read their
run and node configs (fast: no Flower process is started)."""

import pytest
from flwr.app import Context, RecordDict

from clients.app import _partition_id, _state_dir, run_config_flag
from fedtune.errors import ConfigError
from simulations.deploy import DeployError, run_local

from .test_deploy import tiny_config
from .test_federated import tiny_run


def context(run_config=None, **node):
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config or {})


def test_run_config_flags_read_true_and_false_only():
    assert run_config_flag(context({"resume": True}), "resume", False) is True
    assert run_config_flag(context({"resume": "false"}), "resume", True) is False, "a quoted false is false, not a non-empty string"
    assert run_config_flag(context({"resume": " True "}), "resume", False) is True
    assert run_config_flag(context(), "progress", True) is True
    with pytest.raises(ConfigError, match="run config resume: must be true or false, got 'no'"):
        run_config_flag(context({"resume": "no"}), "resume", False)


def test_a_node_set_up_for_another_federation_size_is_named():
    cfg = tiny_run()  # 4 clients
    assert _partition_id(context(**{"partition-id": 2, "num-partitions": 4}), cfg) == 2
    assert _partition_id(context(**{"partition-id": 2}), cfg) == 2, "num-partitions is optional"
    with pytest.raises(ConfigError, match="num-partitions=8, but the run has 4 clients"):
        _partition_id(context(**{"partition-id": 2, "num-partitions": 8}), cfg)
    with pytest.raises(ConfigError, match="node config has no partition-id"):
        _partition_id(context(), cfg)
    assert _partition_id(context(**{"partition-id": "3", "num-partitions": "4"}), cfg) == 3, "digits as a string"
    for bad in (2.5, "2.5", True, "abc", -1):
        with pytest.raises(ConfigError, match=f"node config partition-id={bad!r}: must be a whole number"):
            _partition_id(context(**{"partition-id": bad}), cfg)
    with pytest.raises(ConfigError, match="partition-id=4: must be below num-partitions=4"):
        _partition_id(context(**{"partition-id": 4, "num-partitions": 4}), cfg)
    with pytest.raises(ConfigError, match="partition-id='2.5'"):  # the state folder is not client-2.5
        _state_dir(context(**{"partition-id": "2.5", "state-dir": "/tmp/x"}))


def test_a_state_dir_under_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _state_dir(context(**{"partition-id": 1, "state-dir": "~/.fedtune"})) == tmp_path / ".fedtune" / "client-1"


def test_deploy_local_refuses_before_starting_anything(tmp_path):
    config = tiny_config(tmp_path, rounds=1)
    out = tmp_path / "out"
    with pytest.raises(DeployError, match="cannot hold"):
        run_local(out, 2, config, ['name="my run"'])
    with pytest.raises(DeployError, match="2 node\\(s\\) but federation.new_clients=2"):
        run_local(out, 2, config, ["federation.new_clients=2", "federation.personalization=lda"])
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # a folder holding a run that stopped early
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        run_local(out, 2, config)
    assert not (out / "deploy").exists(), "no process was started"
    # --profiles go into the run's config too: the server labels each client's results with it
    from fedtune.runconfig import load_run_config
    from simulations.deploy import run_overrides

    sets = run_overrides(config, [], 3, ["rpi", "phone"])
    assert load_run_config(config, sets).federation.profiles == ["rpi", "phone"] and load_run_config(config, sets).federation.num_clients == 3
    assert load_run_config(config, run_overrides(config, [], 2, None)).federation.profiles == ["workstation"], "the config's own"


def test_deploy_certs_keeps_an_existing_ca_and_private_keys_are_owner_only(tmp_path, capsys):
    import stat

    from simulations.deploy import main

    folder = tmp_path / "certs"
    assert main(["certs", str(folder)]) == 0
    ca = (folder / "ca.crt").read_bytes()
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    assert main(["certs", str(folder), "--host", "myserver.lan"]) == 1
    assert "ca.crt exists" in capsys.readouterr().err and (folder / "ca.crt").read_bytes() == ca
    assert main(["certs", str(folder), "--host", "myserver.lan", "--force"]) == 0
    assert (folder / "ca.crt").read_bytes() != ca
