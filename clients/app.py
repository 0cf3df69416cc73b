"""The Flower ClientApp: Messages in, fedtune.client.ClientRuntime calls, Messages out.

The run config comes from the app factory (simulations) or from the run
config's `config` (a YAML path) and `overrides` (";"-separated key=value) in
deployment. The node config gives `partition-id` and optionally `profile`
(a device profile name, or "auto"; without it a device measures itself) and `state-dir` (where personal state is kept on the
device, so it survives a restart).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedtune import protocol
from fedtune.client import ClientRuntime
from fedtune.client_state import (
    KEEP_FILES,
    ClientState,
    arrays_sha256,
    read_client_state,
    read_global_copy,
    state_from,
    state_meta,
    write_client_state,
    write_global_copy,
)
from fedtune.errors import ConfigError
from fedtune.heads import split_stats
from fedtune.profiles import AUTO
from fedtune.runconfig import RunConfig, load_run_config

from .records import arrays_to_numpy, metric_record, numpy_to_arrays, tensor_bytes

STATE_ARRAYS = "fedtune.personal"
STATE_CONFIG = "fedtune.client"
GLOBAL_ARRAYS = "fedtune.global"  # the global model this node holds (sparse downlink), with its version
GLOBAL_VERSION = "fedtune.global-version"


def run_config_from_context(context: Context) -> RunConfig:
    path = context.run_config.get("config")
    overrides = [o for o in str(context.run_config.get("overrides", "")).split(";") if o.strip()]
    if path and not Path(str(path)).is_absolute() and not Path(str(path)).exists():
        # relative to the app (the project root) when run through `flwr run`
        path = Path(__file__).resolve().parent.parent / str(path)
    return load_run_config(path or None, overrides)


def run_config_flag(context: Context, key: str, default: bool) -> bool:
    """A true/false key of the Flower run config (`--run-config 'resume=false'`; Flower passes
    a quoted "false" as a string, which bool() would read as true)."""
    value = context.run_config.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"run config {key}: must be true or false, got {value!r}")


def _state_dir(context: Context, default_dir: Path | None = None) -> Path | None:
    state_dir = context.node_config.get("state-dir") or default_dir or context.run_config.get("state-dir")
    if not state_dir:
        return None
    pid = _partition_id(context) if "partition-id" in context.node_config else context.node_id
    return Path(str(state_dir)).expanduser() / f"client-{pid}"


def load_state(context: Context, default_dir: Path | None = None, before_round: int | None = None, run: str | None = None) -> ClientState:
    """The client's personal state in run `run` (the server's run token): from the context
    (same process) or the device's disk.

    On disk, one file per round is kept; the newest one of the run written before
    `before_round` is used, so a server that repeats a round after a crash gets the same
    client state, and a state-dir that held another run gives this one nothing of it.
    """
    if STATE_CONFIG in context.state.config_records:
        meta = json.loads(str(context.state.config_records[STATE_CONFIG]["json"]))
        if (before_round is None or meta.get("round", 0) < before_round) and (run is None or meta.get("run") in (None, run)):
            personal = arrays_to_numpy(context.state.array_records[STATE_ARRAYS]) if STATE_ARRAYS in context.state.array_records else {}
            return state_from(personal, meta)
    folder = _state_dir(context, default_dir)
    return (read_client_state(folder, before_round, run, claim=True) if folder is not None else None) or ClientState()


def save_state(context: Context, state: ClientState, default_dir: Path | None = None, server_round: int = 0, keep: int = KEEP_FILES,
               run: str | None = None) -> None:
    """Keep `state` of run `run` in the context and, with a state-dir, on disk (the run's
    newest `keep` rounds; another run's files there are set aside)."""
    context.state[STATE_ARRAYS] = numpy_to_arrays(state.personal)
    context.state[STATE_CONFIG] = ConfigRecord({"json": json.dumps(state_meta(state, server_round, run))})
    folder = _state_dir(context, default_dir)
    if folder is not None:
        write_client_state(folder, state, server_round, keep, run)


def receive_global(msg: Message, context: Context, initial=None, default_dir: Path | None = None) -> dict[str, np.ndarray] | None:
    """The whole global model of an instruction: its arrays, completed from the copy this node
    holds when the server sent only what changed (protocol.BASE_VERSION); None when the node
    holds no copy of that version (it then asks for the whole model). A node with no copy
    that is sent changes to version 0 builds the run's starting model with `initial()` and
    uses it when its checksum is the one the server sent (protocol.INITIAL_SHA256); a saved
    version 0 whose checksum is not that one (left by another run in the same state-dir) is
    set aside the same way.

    The copy is kept in the node's state-dir when there is one (the node config's, else
    `default_dir`, else the run config's: a device keeps it across restarts, a simulated run
    across --resume, on either launcher), else in the context."""
    arrays = arrays_to_numpy(msg.content.array_records[protocol.ARRAYS])
    config = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
    base, version = int(config.get(protocol.BASE_VERSION, -1)), int(config.get(protocol.MODEL_VERSION, -1))
    folder, run = _state_dir(context, default_dir), _run_token(config)
    kept = False  # the copy already kept is this version: nothing to write again
    if base >= 0:
        held = read_global_copy(folder, run) if folder is not None else _context_copy(context)
        kept = held is not None and held[1] == base == version and not arrays
        want = config.get(protocol.INITIAL_SHA256)
        if held is not None and held[1] == 0 and base == 0 and want and arrays_sha256(held[0]) != want:
            log(30, "node %s: its saved version 0 is not this run's starting model (a copy left by another run?): set aside", context.node_id)
            held, kept = None, False
        if held is None and base == 0 and want and initial is not None:
            built = initial()
            if arrays_sha256(built) == want:
                held, kept = (built, 0), False  # built here, not kept yet
            else:
                log(30, "node %s: the starting model it builds is not the server's (another pretrained file?)", context.node_id)
        if held is None or held[1] != base:
            log(30, "node %s holds %s, the server sent changes to version %d: asking for the whole model",
                context.node_id, "no model copy" if held is None else f"version {held[1]}", base)
            return None
        missing = [n for n in held[0] if n not in arrays]
        arrays = {**{n: held[0][n] for n in missing}, **arrays}
    if version >= 0 and not kept:  # (an evaluation of the version a node trained on writes nothing: no flash wear)
        if folder is not None:
            write_global_copy(folder, arrays, version, run)
        else:
            context.state[GLOBAL_ARRAYS] = numpy_to_arrays(arrays)
            context.state[GLOBAL_VERSION] = ConfigRecord({"version": version})
    return arrays


def _context_copy(context: Context) -> tuple[dict[str, np.ndarray], int] | None:
    if GLOBAL_ARRAYS not in context.state.array_records or GLOBAL_VERSION not in context.state.config_records:
        return None
    return arrays_to_numpy(context.state.array_records[GLOBAL_ARRAYS]), int(context.state.config_records[GLOBAL_VERSION]["version"])


def _run_token(config: ConfigRecord) -> str | None:
    """The instruction's run token (None: the server sends none, a run from before tokens)."""
    token = config.get(protocol.RUN_TOKEN)
    if token is None:
        return None
    if not protocol.valid_run_token(token):
        raise ConfigError(f"instruction: {protocol.RUN_TOKEN} {token!r} is not a run token (letters, digits, - and _)")
    return str(token)


def need_full_model(msg: Message) -> Message:
    return Message(content=RecordDict({protocol.METRICS: MetricRecord({protocol.NEED_FULL_MODEL: 1})}), reply_to=msg)


def _fed_stats(msg: Message) -> dict[str, dict[str, np.ndarray]]:
    """The federation's feature statistics sent with an evaluate instruction, per task."""
    if protocol.FED_STATS not in msg.content.array_records:
        return {}
    return split_stats({k: v.astype(np.float64) for k, v in arrays_to_numpy(msg.content.array_records[protocol.FED_STATS]).items()})


def node_profile(context: Context, simulated: bool) -> str | None:
    """The device profile a client plans for: the node config's `profile` when given; without
    one, a simulated client takes the run config's `federation.profiles` (None here) and a
    client launched by Flower on a device measures what it has ("auto")."""
    profile = context.node_config.get("profile")
    if profile:
        return str(profile)
    return None if simulated else AUTO


def check_config_key(msg: Message, cfg: RunConfig, context: Context) -> None:
    """A node that read another run config than the server's (an edited YAML on one side,
    another checkout's copy, other overrides) would train another setting under the same run:
    it refuses the instruction, naming both keys."""
    config = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
    want = config.get(protocol.CONFIG_KEY)
    if want is not None and str(want) != cfg.key():
        source = context.run_config.get("config") or "the embedded default"
        raise ConfigError(f"this node's run config ({source}, overrides {context.run_config.get('overrides', '')!r}; key {cfg.key()}) is not the "
                          f"server's (key {want}): give the SuperLink and every SuperNode the same config file and overrides")


def _partition_id(context: Context, cfg: RunConfig | None = None) -> int:
    """The node's partition id; with `cfg`, a `num-partitions` the node config gives must be the
    run's (a device set up for another federation's size would train on another split)."""
    if "partition-id" not in context.node_config:
        raise ConfigError("node config has no partition-id (start the SuperNode with --node-config \"partition-id=0 num-partitions=N\")")
    given = context.node_config.get("num-partitions")
    if given is not None and not _whole(given):
        raise ConfigError(f"node config num-partitions={given!r}: must be a whole number")
    if cfg is not None and given is not None and int(given) != cfg.federation.total_clients():
        raise ConfigError(f"node config num-partitions={given}, but the run has {cfg.federation.total_clients()} clients "
                          "(federation.num_clients plus new_clients): restart the SuperNode with the run's count")
    pid = context.node_config["partition-id"]
    if not _whole(pid):
        raise ConfigError(f"node config partition-id={pid!r}: must be a whole number (0, 1, ...)")
    if given is not None and not int(pid) < int(given):
        raise ConfigError(f"node config partition-id={pid}: must be below num-partitions={given}")
    return int(pid)


def _whole(value) -> bool:
    """A whole number >= 0 as a node config gives it (an int, or its digits as a string; not a
    bool, a float or 2.5)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (isinstance(value, str) and value.strip().isdigit())


def make_client_app(cfg: RunConfig | None = None, state_dir: Path | None = None) -> ClientApp:
    """A ClientApp for `cfg` (None: read the config from the Flower run config).

    With `state_dir`, each client also keeps its personal state in a file there (as a
    device does), so a resumed simulation continues exactly where it stopped.
    """
    app = ClientApp()

    def starting_model(context: Context):
        """Builds the run's starting model (as the server did before round 1)."""
        from fedtune.federated import global_model, state_to_numpy

        return lambda: state_to_numpy(global_model(cfg if cfg is not None else run_config_from_context(context)))

    def runtime(context: Context, msg: Message) -> ClientRuntime:
        run_cfg = cfg if cfg is not None else run_config_from_context(context)
        check_config_key(msg, run_cfg, context)
        simulated = cfg is not None or run_config_flag(context, "simulated", False)
        threads = context.node_config.get("threads")
        if threads is not None:  # the node's own setting (`deploy local` shares the machine's cores among its nodes)
            if not _whole(threads) or int(threads) < 1:
                raise ConfigError(f"node config threads={threads!r}: must be a whole number >= 1")
            torch.set_num_threads(int(threads))
        elif simulated:  # virtual clients share the machine's cores; a device keeps torch's default (all of its cores)
            torch.set_num_threads(max(1, run_cfg.backend.torch_threads))
        return ClientRuntime(run_cfg, _partition_id(context, run_cfg), node_profile(context, simulated=simulated))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = runtime(context, msg)  # a misconfigured node fails here, before it keeps anything
        global_arrays = receive_global(msg, context, starting_model(context), state_dir)
        if global_arrays is None:
            return need_full_model(msg)
        config = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
        importance = config.get(protocol.IMPORTANCE)
        server_round = int(config.get(protocol.SERVER_ROUND, 0))
        run = _run_token(config)
        update, counts, metrics, state = rt.fit(global_arrays, load_state(context, state_dir, server_round, run), list(importance) if importance else None, server_round)
        # every round since the server's last checkpoint may be repeated after a crash
        save_state(context, state, state_dir, server_round, keep=rt.cfg.federation.checkpoint_every + 1, run=run)
        metrics.bytes_received = tensor_bytes(msg.content)
        reply = RecordDict(
            {
                protocol.ARRAYS: numpy_to_arrays(update),
                protocol.METRICS: metric_record(metrics.to_dict()),
                protocol.UPDATE_COUNTS: MetricRecord(counts),
            }
        )
        return Message(content=reply, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which partition this node holds (the server tells new clients from training ones)."""
        return Message(content=RecordDict({protocol.METRICS: MetricRecord({"partition-id": _partition_id(context)})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        rt = runtime(context, msg)
        global_arrays = receive_global(msg, context, starting_model(context), state_dir)
        if global_arrays is None:
            return need_full_model(msg)
        config = msg.content.config_records.get(protocol.CONFIG, ConfigRecord())
        server_round = int(config.get(protocol.SERVER_ROUND, 0))
        run = _run_token(config)
        state = load_state(context, state_dir, server_round + 1 if server_round else None, run)
        fed_stats = _fed_stats(msg)
        want_stats = bool(config.get(protocol.WANT_HEAD_STATS))
        metrics, stats, kept = rt.evaluate(global_arrays, state, fed_stats, final=bool(config.get(protocol.FINAL, False)), want_stats=want_stats)
        if kept is not None:  # the final evaluation built a personal head: keep it (export --client reads it)
            save_state(context, kept, state_dir, server_round, keep=rt.cfg.federation.checkpoint_every + 1, run=run)
        content = RecordDict({protocol.METRICS: metric_record(metrics.to_dict())})
        if want_stats:
            content[protocol.HEAD_STATS] = numpy_to_arrays(stats)
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
