"""The real deployment on loopback: a SuperLink and SuperNodes as separate processes, `flwr run`.

Each test starts real Flower processes (~1 minute on 2 cores): insecure (with a SuperNode
whose node config names an unknown profile), TLS, TLS with authentication and a killed node,
a server that fails at start, and a killed launcher.
"""

import json

import numpy as np
import pytest
import yaml

from fedtune.model import read_state

from .test_federated import TINY_RUN

pytestmark = pytest.mark.slow


def tiny_config(tmp_path, rounds):
    run = {**TINY_RUN, "method": {"name": "alast", "alast": {"k": 2, "memory_fraction": None, "reselect": "round"}},
           "federation": {"rounds": rounds, "profiles": ["workstation"]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def check_checkpoint(out, rounds):
    from fedtune.federated import global_model, state_to_numpy
    from fedtune.runconfig import RunConfig
    from fedtune.typedconfig import from_dict

    state, meta = read_state(out / "checkpoint.safetensors")
    assert json.loads(meta["round"]) == rounds
    start = state_to_numpy(global_model(from_dict(RunConfig, json.loads(meta["run"]))))
    assert set(state) == set(start)
    assert all(np.isfinite(v.numpy()).all() for v in state.values())
    changed = [k for k in start if not np.array_equal(state[k].numpy(), start[k])]
    assert changed and all(k.startswith(("vit.blocks.", "vit.norm.", "heads.")) for k in changed)


def test_deployment_over_loopback_insecure_with_a_misconfigured_node(tmp_path):
    from simulations.deploy import node_configs, run_local

    state_dir = tmp_path / "devices"
    nodes = node_configs(3, ["workstation"], state_dir)
    nodes[2]["profile"] = "no-such-board"  # this SuperNode's operator made a typo
    out = tmp_path / "run"
    summary = run_local(out, nodes, tiny_config(tmp_path, rounds=2), timeout=400)
    assert summary["rounds"] == 2
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["accepted"] == 2
        assert len(r["rejected"]) == 1 and "no-such-board" in r["rejected"][0]["reason"]
    check_checkpoint(out, rounds=2)
    # each device kept its personal state on its own disk, per round
    for pid in (0, 1):
        assert sorted(p.name for p in (state_dir / f"client-{pid}").glob("round-*.npz")) == ["round-000001.npz", "round-000002.npz"]
    assert not (state_dir / "client-2").exists()


def test_deployment_over_loopback_with_tls(tmp_path):
    from simulations.deploy import run_local

    out = tmp_path / "run"
    summary = run_local(out, 2, tiny_config(tmp_path, rounds=1), tls=True, timeout=400)
    assert summary["rounds"] == 1 and summary["bytes_up_total"] > 0
    assert (out / "plots" / "accuracy.png").is_file(), "the run's plots are written before it counts as done"
    assert (out / "deploy" / "certs" / "ca.crt").is_file()
    assert "https://" in (out / "deploy" / "superlink.log").read_text()
    check_checkpoint(out, rounds=1)


def test_authenticated_deployment_refuses_an_unregistered_node_and_survives_a_killed_one(tmp_path):
    """TLS + SuperNode authentication: three registered nodes train, a node whose key nobody
    registered is refused; one registered node is SIGKILLed after round 1 and the federation
    finishes with the other two (federation.min_clients 2, a short round timeout); nothing is
    left running afterwards."""
    import os
    import signal
    import threading
    import time

    import psutil

    from simulations.deploy import run_local

    out = tmp_path / "run"
    killed = {}
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. a resource tracker an earlier test left

    def kill_after_round_1(dep):
        def watch():
            metrics = out / "metrics.jsonl"
            while not (metrics.is_file() and '"round": 1' in metrics.read_text()):
                time.sleep(0.5)
            proc = next(p for p, log in dep.procs if log.stem == "supernode-2")
            os.kill(proc.pid, signal.SIGKILL)
            killed["at"] = time.time()
        threading.Thread(target=watch, daemon=True).start()

    summary = run_local(out, 3, tiny_config(tmp_path, rounds=3), ["federation.min_clients=2", "federation.round_timeout_s=90"],
                        tls=True, auth=True, intruders=1, timeout=500, on_started=kill_after_round_1)
    assert killed and summary["rounds"] == 3 and "error" not in summary
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[1]["accepted"] == 3, "the three registered nodes trained; the intruder took no part"
    assert all(r["accepted"] == 2 for r in rounds[3:]), "after the kill the other two go on"
    intruder_log = (out / "deploy" / "supernode-3.log").read_text()
    assert "Failed to activate SuperNode" in intruder_log, intruder_log[-2000:]
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, f"every Flower process was stopped: {[p.cmdline() for p in left]}"


def test_a_server_that_fails_at_start_fails_the_deployment_within_seconds(tmp_path):
    """The ServerApp cannot build its model (a pretrained file that does not exist, which only
    the running server reads): the launcher reports the failure with the log's tail soon after
    `flwr run` ends, not after the whole --timeout, and leaves nothing running."""
    import psutil

    from simulations.deploy import DeployError, run_local

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(DeployError, match="ServerApp failed|`flwr run` failed") as err:
        run_local(tmp_path / "run", 2, tiny_config(tmp_path, rounds=1), ["model.pretrained=/nonexistent/backbone.safetensors"], timeout=900)
    assert "/nonexistent/backbone.safetensors" in str(err.value), "the error shows why the run failed, not only that it did"
    assert "did not finish within" not in str(err.value), "failed at once, not at the 900 s timeout"
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, f"every Flower process was stopped: {[p.cmdline() for p in left]}"


def test_a_killed_launcher_leaves_no_superlink_behind(tmp_path):
    """The SuperLink runs in its own session (a terminal's Ctrl-C reaches only the launcher);
    when the launcher is SIGKILLed, the reaper takes the SuperLink and its children down."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    script = ("import sys, time\nfrom pathlib import Path\nfrom simulations.deploy import Deployment\n"
              f"dep = Deployment(Path({str(tmp_path / 'dep')!r}), simulation=True)\ndep.start_superlink()\n"
              "print(dep.procs[0][0].pid, flush=True)\ntime.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    superlink = psutil.Process(int(launcher.stdout.readline()))
    try:
        assert superlink.is_running()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        end = time.time() + 60  # the reaper polls; a loaded machine may take a while
        pids = tmp_path / "dep" / "deployment.pids"
        while time.time() < end and (pids.exists() or (superlink.is_running() and superlink.status() != psutil.STATUS_ZOMBIE)):
            time.sleep(0.2)
        assert not superlink.is_running() or superlink.status() == psutil.STATUS_ZOMBIE, "the SuperLink outlived its launcher"
        assert not pids.exists(), "the reaper finished"
    finally:  # whatever failed above, no SuperLink is left running
        launcher.kill()
        with contextlib.suppress(psutil.Error):
            for p in [superlink, *superlink.children(recursive=True)]:
                p.kill()
