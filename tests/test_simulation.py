"""One real Flower simulation (Ray): outputs, a client that fails mid-round, resume.

Ray takes ~10 s to start, so this file runs few simulations on a tiny model.
"""

import contextlib
import json

import pytest

from fedtune.typedconfig import from_dict

from .test_federated import TINY_RUN

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _own_ray(monkeypatch):
    """Each simulation starts its own Ray: never join a cluster a RAY_ADDRESS in the environment names."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def run_cfg(top: dict | None = None, **federation):
    from fedtune.runconfig import RunConfig

    data = {**TINY_RUN, "federation": {"num_clients": 3, "rounds": 2, **federation}, "method": {"name": "alast", "alast": {"k": 2, "memory_fraction": None, "reselect": "round"}}, **(top or {})}
    return from_dict(RunConfig, data)


def test_simulation_writes_outputs_and_survives_a_failing_client(tmp_path):
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    # Multitask MoE: clients of different tasks report different per-task metrics.
    cfg = run_cfg(top={"tasks": ["digit", "parity"], "moe": {"num_experts": 4, "top_k": 2, "blocks": [1, 3]}},
                  client_tasks=[["digit"], ["parity"]], head_fit="lda")
    inner = make_client_app(cfg)
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == 1 and int(msg.content.config_records["config"]["server-round"]) == 1:
            raise RuntimeError("simulated device crash")
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return inner(msg, context)

    out = tmp_path / "run"
    run_simulation(server_app=make_server_app(cfg, out, progress=False), client_app=app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_global", "accuracy_personalized", "bytes_up_total", "bytes_down_total", "bytes_up_full_fedavg", "rounds", "wall_time_s", "peak_rss_bytes"):
        assert key in summary, key
    assert summary["rounds"] == 2
    # what makes runs comparable, recorded beside the results (fedtune.report.run_identity)
    assert summary["seed"] == 0 and summary["num_clients"] == 3 and summary["num_new_clients"] == 0
    assert summary["partition"]["scheme"] == "iid" and summary["data"]["name"] == "digits"
    assert 0 < summary["bytes_up_total"] < summary["bytes_up_full_fedavg"]
    assert 0 < summary["bytes_up_client_max"] < summary["model_bytes"]
    assert summary["bytes_up_client_max_vs_model"] == summary["bytes_up_client_max"] / summary["model_bytes"]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["accepted"] == 2 and len(rounds[1]["rejected"]) == 1  # the crashed client
    assert "simulated device crash" in rounds[1]["rejected"][0]["reason"]
    assert rounds[2]["accepted"] == 3
    assert summary["empty_rounds"] == [] and "error" not in summary  # one failing client fails no round
    assert set(summary["accuracy_per_task"]) == {"digit", "parity"}
    # MoE: the routing's assignments in training and those the capacity turned away
    assert summary["moe_training_assignments"] == sum(sum(f) for r in rounds for c in r.get("clients", []) if c["accepted"] for f in c["experts"].values()) > 0
    assert summary["moe_training_dropped"] == sum(c["expert_dropped"] for r in rounds for c in r.get("clients", []) if c["accepted"])
    assert summary["moe_training_dropped_fraction"] == summary["moe_training_dropped"] / summary["moe_training_assignments"]
    # the last round's heads are fitted from the clients' feature statistics, which count as bytes up
    assert summary["head_fit"] == "lda" and sorted(rounds[2]["head_fit_tasks"]) == ["digit", "parity"]
    assert rounds[2]["head_fit_examples"]["digit"] > 0 and summary["accuracy_global_before_head_fit"] is not None
    assert "head_fit" not in rounds[1]
    assert summary["bytes_up_total"] == sum(summary["bytes_up_per_round"]) + rounds[2]["bytes_up_head_stats"] > sum(summary["bytes_up_per_round"])
    assert summary["accuracy_per_task"] == rounds[2]["accuracy_per_task"]
    assert summary["accuracy_global"] == pytest.approx(sum(summary["accuracy_per_task"].values()) / 2)
    before = summary["accuracy_per_task_before_head_fit"]
    assert set(before) == {"digit", "parity"} and summary["accuracy_global_before_head_fit"] == pytest.approx(sum(before.values()) / 2)
    for plot in ("accuracy.png", "bytes.png", "blocks.png", "experts_per_task.png", "experts_per_client.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    assert (out / "checkpoint.safetensors").is_file()


def _simulate_cmd(config, out, *extra):
    import sys

    return [sys.executable, "-m", "fedtune.cli", "simulate", str(config), "--out", str(out), "--no-progress", *extra]


def test_a_run_in_which_no_client_can_train_exits_non_zero(tmp_path):
    """Every client fails (full fine-tuning on the 1 MiB mcu profile): `fedtune simulate` exits 3
    with the clients' reason in summary.json, not 0 with the untrained model's accuracy."""
    import subprocess

    import yaml

    data = {**TINY_RUN, "federation": {"num_clients": 2, "rounds": 1, "profiles": ["mcu"]}, "method": {"name": "full"}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    done = subprocess.run(_simulate_cmd(config, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["empty_rounds"] == [1]
    assert "round(s) [1] had no accepted client reply" in summary["error"] and "no full plan fits device profile 'mcu'" in summary["error"]
    assert "no accepted client reply" in done.stderr


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def test_killed_simulation_resumes_to_the_same_result(tmp_path):
    """A run killed (SIGKILL, Ray and all) after round 2 of 4 resumes from its checkpoint, loses
    no completed round, and ends exactly where the uninterrupted run ends: the personal heads of
    the rounds after the resume are built from the federation's statistics as before it. A run
    stopped before its final evaluation does that evaluation on --resume."""
    import os
    import signal
    import subprocess
    import time

    import numpy as np
    import psutil
    import yaml

    from fedtune.model import read_state

    data = {**TINY_RUN, "federation": {"num_clients": 3, "rounds": 4, "personalization": "lda"},
            "method": {"name": "alast", "alast": {"k": 2, "memory_fraction": None, "reselect": "round"}}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_simulate_cmd(config, whole), check=True, capture_output=True, timeout=600)

    before_kill = {p.pid for p in psutil.process_iter()}
    proc = subprocess.Popen(_simulate_cmd(config, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt, deadline = killed / "checkpoint.safetensors", time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file() and json.loads(read_state(ckpt)[1]["round"]) >= 2:
                break
            time.sleep(0.05)
    finally:
        ours = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's workers live outside the killed process group (some are re-parented): take them
        # down too, as a crash would; only this user's Ray processes started during the run
        me = os.getuid()
        for p in psutil.process_iter(["pid", "cmdline", "uids"]):
            cmd = p.info["cmdline"] or []
            ray = any(part.startswith("ray::") or "/ray/" in part for part in cmd[:2])
            if p.pid in ours or (p.pid not in before_kill and ray and p.info["uids"] and p.info["uids"].real == me):
                with contextlib.suppress(psutil.Error):
                    p.kill()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    done = json.loads(read_state(ckpt)[1]["round"])
    assert 2 <= done < 4
    before = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in before][: done + 1] == list(range(done + 1))

    subprocess.run(_simulate_cmd(config, killed, "--resume"), check=True, capture_output=True, timeout=600)
    a, b = json.loads((whole / "summary.json").read_text()), json.loads((killed / "summary.json").read_text())
    assert b["rounds"] == 4 and b["accuracy_global_per_round"] == a["accuracy_global_per_round"]
    assert b["accuracy_global"] == a["accuracy_global"] and b["accuracy_personalized"] == a["accuracy_personalized"]
    after = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in after] == [0, 1, 2, 3, 4]
    assert after[: done + 1] == before[: done + 1]  # completed rounds kept as they were
    assert after[done + 1]["elapsed_s"] > after[done]["elapsed_s"] and b["wall_time_s"] >= after[-1]["elapsed_s"], "time counts over both processes"
    each = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("accuracy_personalized") for r in after] == [r.get("accuracy_personalized") for r in each]
    # every evaluated round's statistics count as bytes up, not only the head fit's
    assert all(r["bytes_up_head_stats"] > 0 for r in each[1:]) and b["bytes_up_total"] == a["bytes_up_total"]
    assert a["bytes_up_total"] == sum(r["bytes_up"] + r.get("bytes_up_head_stats", 0) for r in each)
    final = (killed / "final_evaluation.json").read_text()
    (killed / "final_evaluation.json").unlink()
    (killed / "summary.json").unlink()
    subprocess.run(_simulate_cmd(config, killed, "--resume"), check=True, capture_output=True, timeout=600)
    again = json.loads((killed / "summary.json").read_text())
    assert again["accuracy_personalized"] == a["accuracy_personalized"] and again["clients"] == a["clients"]

    def by_partition(text):  # node ids are new in every simulation
        return sorted(({k: v for k, v in e.items() if k != "node_id"} for e in json.loads(text)["client_evaluations"]), key=lambda e: e["partition_id"])

    assert by_partition((killed / "final_evaluation.json").read_text()) == by_partition(final)
    wa, wb = read_state(whole / "checkpoint.safetensors")[0], read_state(ckpt)[0]
    assert set(wa) == set(wb)
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=0, atol=1e-6, err_msg=k)


def test_protocol_run_with_sparse_downlink_lost_copy_and_a_new_client(tmp_path):
    """Pooled partitions, closed-form personal heads, the sparse downlink with a client that
    loses its model copy mid-run (it is resent everything, no round lost), and a new client
    that only joins the final evaluation."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from clients.app import GLOBAL_ARRAYS, make_client_app
    from server.app import make_server_app

    cfg = run_cfg(top={"partition": {"scheme": "dirichlet", "alpha": 0.5, "min_partition_size": 5, "local_test_fraction": 0.25, "pool": True}},
                  personalization="lda", head_fit="lda", downlink="sparse", new_clients=1)
    inner = make_client_app(cfg)
    app = ClientApp()
    calls = tmp_path / "train-calls.txt"  # the ClientApp runs in Ray workers: they report through a file

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        with open(calls, "a") as f:
            f.write(f"{pid} {int(msg.content.config_records['config']['server-round'])}\n")
        if pid == 0 and msg.content.config_records["config"]["server-round"] == 2 and GLOBAL_ARRAYS in context.state.array_records:
            del context.state[GLOBAL_ARRAYS]  # a wiped device
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return inner(msg, context)

    @app.query()
    def query(msg, context):
        return inner(msg, context)

    out = tmp_path / "run"
    run_simulation(server_app=make_server_app(cfg, out, progress=False), client_app=app, num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    summary = json.loads((out / "summary.json").read_text())
    seen: dict[int, list] = {}
    for line in calls.read_text().splitlines():
        pid, rnd = map(int, line.split())
        seen.setdefault(pid, []).append(rnd)
    assert 3 not in seen, "the new client never trains"
    assert sorted(seen) == [0, 1, 2] and seen[0].count(2) == 2, "partition 0 got round 2 twice: sparse, then the whole model"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[2]["accepted"] == 3 and "error" not in summary
    assert [c["partition_id"] for c in summary["clients"]] == [0, 1, 2]
    assert [c["partition_id"] for c in summary["new_clients"]["clients"]] == [3]
    for c in summary["clients"]:  # each client's latest numbers are the final evaluation's
        latest = summary["accuracy_per_client"][str(c["partition_id"])]
        assert latest["round"] == "final" and latest["accuracy_personalized"] == c["accuracy_personalized"]
    assert "3" not in summary["accuracy_per_client"], "a new client is reported under new_clients"
    for key in ("accuracy_personalized", "accuracy_global_local", "bytes_up_total", "bytes_down_total", "bytes_up_full_fedavg", "bytes_down_full_fedavg"):
        assert summary[key] is not None, key
    assert summary["clients_evaluated_in"] == "final evaluation"
    assert 0 < summary["bytes_down_total"] < summary["bytes_down_full_fedavg"]
    # round 1: every client built the starting model itself, so only the evaluate instructions
    # carried parameters (what round 1 changed, at most a model each); round 2: what changed,
    # plus the whole model once, to the client that lost its copy
    model = summary["model_bytes"]
    assert 0 < rounds[1]["bytes_down"] <= 3 * model < rounds[1]["bytes_down_full_fedavg"]
    assert model < rounds[2]["bytes_down"] < rounds[2]["bytes_down_full_fedavg"]
    # full FedAvg from the same start leaves out only round 1's three train instructions: they
    # carried the starting model, which every client built (the new client gets the final one)
    assert rounds[1]["bytes_down_full_fedavg_same_start"] == rounds[1]["bytes_down_full_fedavg"] - 3 * model
    assert rounds[2]["bytes_down_full_fedavg_same_start"] == rounds[2]["bytes_down_full_fedavg"]
    assert rounds[2]["bytes_down_full_fedavg"] == rounds[1]["bytes_down_full_fedavg"], "the resend is not one of full FedAvg's instructions"
    assert summary["bytes_down_full_fedavg_same_start"] == summary["bytes_down_full_fedavg"] - 3 * model
    assert summary["traffic_ratio_vs_full_fedavg"] < summary["traffic_ratio_vs_full_fedavg_same_start"] < 1
    final = json.loads((out / "final_evaluation.json").read_text())
    assert final["clients_asked"] == 4


def test_the_flwr_run_launcher_gives_the_same_outputs(tmp_path):
    """backend.launcher: flwr-run: a private SuperLink with Flower's simulation runtime and
    `flwr run` (the path Flower supports) writes the same files; nothing is left running."""
    import psutil

    from simulations.run import simulate

    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. a resource tracker an earlier test left
    cfg = run_cfg(top={"backend": {"launcher": "flwr-run"}}, head_fit="lda")
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert summary["rounds"] == 2 and "error" not in summary and summary["accuracy_personalized"] is not None
    _, alive = psutil.wait_procs([p for p in psutil.Process().children(recursive=True) if p.pid not in before], timeout=20)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    reference = simulate(run_cfg(top={"backend": {"launcher": "run_simulation"}}, head_fit="lda"), tmp_path / "reference", progress=False)  # Flower's run_simulation
    for key in ("accuracy_global_per_round", "accuracy_global", "accuracy_global_before_head_fit", "accuracy_personalized", "bytes_up_total", "bytes_down_total"):
        assert summary[key] == reference[key], key
    for name in ("metrics.jsonl", "checkpoint.safetensors", "final_evaluation.json", "config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "run" / "client_state").iterdir()) == ["client-0", "client-1", "client-2"]
