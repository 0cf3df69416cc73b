"""One real Flower simulation (Ray): outputs, a client that fails mid-round, resume.

Ray takes ~10 s to start, so this file runs few simulations on a tiny model.
"""

import json

import pytest

from fedtune.typedconfig import from_dict

from .test_federated import TINY_RUN

pytestmark = pytest.mark.slow


def run_cfg(**federation):
    from fedtune.federated import RunConfig

    data = {**TINY_RUN, "federation": {"num_clients": 3, "rounds": 2, **federation}, "method": {"name": "alast", "alast": {"k": 2, "memory_fraction": None, "reselect": "round"}}}
    return from_dict(RunConfig, data)


def test_simulation_writes_outputs_and_survives_a_failing_client(tmp_path):
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    cfg = run_cfg()
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
    assert 0 < summary["bytes_up_total"] < summary["bytes_up_full_fedavg"]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["accepted"] == 2 and len(rounds[1]["rejected"]) == 1  # the crashed client
    assert "simulated device crash" in rounds[1]["rejected"][0]["reason"] or rounds[1]["rejected"][0]["reason"]
    assert rounds[2]["accepted"] == 3
    for plot in ("accuracy.png", "bytes.png", "blocks.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    assert (out / "checkpoint.safetensors").is_file()
