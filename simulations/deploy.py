"""Run fedtune as a real Flower deployment: a SuperLink, SuperNodes, and `flwr run`.

    python -m simulations.deploy certs DIR [--host NAME ...]
    python -m simulations.deploy local [--nodes 2] [--config YAML] [--set key=value ...]
                                       [--profiles rpi,phone] [--tls [--auth]] [--out DIR]

`certs` writes a test certificate authority and a SuperLink certificate for the given
host names (localhost and 127.0.0.1 always): ca.crt, ca.key, server.pem, server.key.

`local` starts a SuperLink and `--nodes` SuperNodes as separate processes on this machine
(each with its own node config: partition-id, num-partitions, profile, state-dir), then
submits the app with `flwr run` against them, waits for the run to finish, and stops
them. Insecure by default; `--tls` generates certificates and runs everything over TLS.
The run writes into `--out` (summary.json, metrics.jsonl, plots, checkpoint) and leaves
the processes' logs in `--out`/deploy/. Flower's own configuration (the SuperLink
connection `flwr run` uses) goes to a private FLWR_HOME there, so ~/.flwr is untouched.

On a real device, a SuperNode needs only `pip install` of this project and one command;
see README, "Deployment".
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.errors import FedtuneError

PROJECT = Path(__file__).resolve().parent.parent
CONNECTION = "fedtune-local"


class DeployError(FedtuneError, RuntimeError):
    """A deployment step failed; the message names the step and where its log is."""


def app_dir() -> Path:
    """The Flower app `flwr run` submits: the project's source folder, with its pyproject.toml
    (an install into site-packages has none)."""
    if not (PROJECT / "pyproject.toml").is_file():
        raise DeployError(f"`flwr run` submits the Flower app from a source checkout (pyproject.toml beside fedtune/), and {PROJECT} is not one "
                          "(a non-editable install?): install with `pip install -e .` from a checkout, or, for a simulation, set "
                          "backend.launcher: run_simulation")
    return PROJECT


# --- certificates -----------------------------------------------------------------------------


def make_certs(folder: Path, hosts: list[str] | tuple[str, ...] = (), overwrite: bool = True) -> dict[str, Path]:
    """A self-signed CA and a server certificate for `hosts` (+ localhost, 127.0.0.1). Without
    `overwrite`, a folder that holds a CA already is refused: the devices given its ca.crt
    would no longer trust the SuperLink."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not overwrite and (folder / "ca.crt").exists():
        raise DeployError(f"{folder / 'ca.crt'} exists: a new CA would make every device holding that ca.crt refuse the SuperLink; "
                          "choose another folder, or pass --force to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) or ["localhost"])[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    plain = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption())
    files = {"ca_cert": folder / "ca.crt", "ca_key": folder / "ca.key", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca_cert"].write_bytes(ca.public_bytes(pem))
    write_private(files["ca_key"], ca_key.private_bytes(**plain))
    files["cert"].write_bytes(cert.public_bytes(pem))
    write_private(files["key"], key.private_bytes(**plain))
    return files


def write_private(path: Path, data: bytes) -> None:
    """A private key's file, readable by its owner only from the moment it exists."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair for SuperNode authentication, in OpenSSH format:
    `name` (private, 0600) and `name.pub` (what the SuperLink registers)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise DeployError(f"{log.stem} exited with code {proc.returncode} before listening on {port}; see {log}:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"{log.stem} did not listen on port {port} within {timeout:.0f} s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _bin(name: str) -> str:
    """A Flower command from this Python's environment (else from PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name}: not found beside {sys.executable} nor on PATH; install Flower into this environment (pip install -e .)")
    return found


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on this machine, stopped (with their process groups) on exit."""

    workdir: Path
    tls: bool = False
    procs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)
    port: int = 0
    certs: dict[str, Path] = field(default_factory=dict)
    auth: bool = False  # SuperNode authentication: only nodes whose public key is registered join
    simulation: bool = False  # the SuperLink runs Flower's simulation runtime (virtual SuperNodes; no SuperNode processes)
    dead: set[str] = field(default_factory=set)  # SuperNodes that exited during the run
    reaper: subprocess.Popen | None = None  # takes the processes down if the launcher dies (reap_when_orphaned)
    logs: list = field(default_factory=list)  # the processes' open log files, closed in stop()

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise DeployError("SuperNode authentication needs TLS (--tls)")
        # absolute: the processes run from the launcher's folder (so a run config's relative
        # paths mean what they mean under run_simulation), flwr from the project's
        self.workdir = Path(self.workdir).resolve()
        self.cwd = Path.cwd()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home"), "PYTHONUNBUFFERED": "1"}
        if self.tls:
            self.certs = make_certs(self.workdir / "certs")

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        (self.workdir / f"{name}.cmd").write_text(shlex.join(cmd) + "\n")
        handle = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(handle)
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True)
        self.procs.append((proc, log))
        self._watch(proc.pid)
        return proc

    def _watch(self, pid: int) -> None:
        """The processes run in their own sessions (so a terminal's Ctrl-C reaches only the
        launcher, which stops them in order); a reaper in its own session takes them down if
        the launcher dies without doing so (SIGKILL, a crash)."""
        import psutil

        pidfile = (self.workdir / "deployment.pids").resolve()  # the reaper runs from the project folder
        with open(pidfile, "a") as f:
            f.write(f"{pid} {psutil.Process(pid).create_time()}\n")
        if self.reaper is None:
            code = f"from simulations.deploy import reap_when_orphaned; reap_when_orphaned({os.getpid()}, {str(pidfile)!r})"
            self.reaper = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def security(self, server: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.certs["ca_cert"]), "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
        return ["--root-certificates", str(self.certs["ca_cert"])]

    def start_superlink(self) -> None:
        self.port = free_port()
        cmd = [_bin("flower-superlink"), *self.security(True), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--database", str(self.workdir / "superlink.db"),
               *(["--enable-supernode-auth"] if self.auth else []), *(["--simulation"] if self.simulation else [])]
        proc = self._start("superlink", cmd)
        wait_port(self.port, proc, self.workdir / "superlink.log")

    def start_supernode(self, node_config: dict[str, object], register: bool = True) -> None:
        """Start a SuperNode; with authentication it gets its own key pair, whose public key is
        registered with the SuperLink first (`flwr supernode register`) unless `register` is false."""
        index = sum(1 for _, log in self.procs if log.stem.startswith("supernode"))
        config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
        auth: list[str] = []
        if self.auth:
            private, public = make_node_key(self.workdir / "node-keys", f"supernode-{index}")
            if register:
                self.register(public)
            auth = ["--auth-supernode-private-key", str(private)]
        cmd = [_bin("flower-supernode"), *self.security(False), "--superlink", f"127.0.0.1:{self.port}",
               "--port", str(free_port()), "--node-config", config, *auth]
        self._start(f"supernode-{index}", cmd)

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (its Control API)."""
        log = self.workdir / f"register-{public_key.stem}.log"
        try:
            result = subprocess.run([_bin("flwr"), "supernode", "register", str(public_key), CONNECTION], env=self.env, cwd=self.workdir,
                                    capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"registering {public_key.name} with the SuperLink did not finish within 60 s (is the SuperLink up? see {self.workdir / 'superlink.log'})") from exc
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise DeployError(f"registering {public_key.name} with the SuperLink failed (code {result.returncode}); see {log}:\n{_tail(log)}")

    def write_connection(self, options: dict[str, object] | None = None) -> None:
        """FLWR_HOME/config.toml: the connection `flwr run` uses (with `options`, e.g. the
        simulation runtime's `num-supernodes`, as `options.<key> = value` lines)."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{self.port}"']
        lines += [f'root-certificates = "{self.certs["ca_cert"]}"'] if self.tls else ["insecure = true"]
        lines += [f"options.{k} = {_toml_value(v)}" for k, v in (options or {}).items()]
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def check_alive(self) -> None:
        """The SuperLink must live; a SuperNode that exits is noted (once, on stderr) and the run
        goes on with the others: the server's round timeout and minimum of clients decide."""
        for proc, log in self.procs:
            if proc.poll() is None:
                continue
            if not log.stem.startswith("supernode"):
                raise DeployError(f"{log.stem} exited with code {proc.returncode}; see {log}:\n{_tail(log)}")
            if log.stem not in self.dead:
                self.dead.add(log.stem)
                print(f"warning: {log.stem} exited with code {proc.returncode}; the federation goes on without it (see {log})", file=sys.stderr)

    def stop(self) -> None:
        """Stop every process this deployment started and everything they started (the
        SuperLink's ServerApp process, the SuperNodes' ClientApp processes)."""
        import psutil

        descendants = []
        for proc, _ in self.procs:
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc, _ in reversed(self.procs):
            # the whole group, also when its leader has exited: what a SuperNode that died
            # started (its ClientApp processes) is still in the group it led
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.time() + 15
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        _kill_and_wait(descendants)
        for handle in self.logs:
            handle.close()
        self.logs.clear()
        (self.workdir / "deployment.pids").unlink(missing_ok=True)
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
            self.reaper = None

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reap_when_orphaned(parent: int, pidfile: str, poll_s: float = 0.5) -> None:
    """Wait while `parent` (the launcher) lives and `pidfile` exists; if the launcher dies first,
    kill every process the file lists (pid and start time, so a reused pid is spared) and
    all their descendants."""
    import psutil

    path = Path(pidfile)
    while path.exists():
        try:
            if psutil.Process(parent).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    else:
        return
    victims = []
    for line in path.read_text().splitlines():
        pid, started = line.split()
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(started)) < 1e-3:
                victims += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    _kill_and_wait(victims)
    path.unlink(missing_ok=True)


def _kill_and_wait(procs: list, timeout: float = 10.0) -> None:
    """SIGKILL each psutil.Process (gone ones are skipped) and wait for them to exit."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


def run_overrides(config: str | Path, overrides: list[str], count: int, profiles: list[str] | None) -> list[str]:
    """The deployed run's overrides: the user's, the training clients (the last
    `federation.new_clients` of the `count` nodes join for the final evaluation only) and the
    nodes' `profiles` when given (the server labels each client's results with its profile in
    the config, so it must be the one its node runs)."""
    from fedtune.runconfig import load_run_config

    for o in overrides:  # they travel in one TOML string, split at ';' by the apps
        if '"' in o or ";" in o:
            raise DeployError(f"override {o!r}: a deployed run's overrides cannot hold '\"' or ';' (write the value into the config file instead)")
    new = load_run_config(config, overrides).federation.new_clients  # fails here, before any process starts, on a bad config
    if count <= new:
        raise DeployError(f"{count} node(s) but federation.new_clients={new}: the nodes past the training clients are the new clients, so start more than {new}")
    overrides = [*overrides, f"federation.num_clients={count - new}"]
    if profiles:
        overrides.append(f"federation.profiles=[{', '.join(profiles)}]")
    return overrides


def node_configs(nodes: int, profiles: list[str], state_dir: Path) -> list[dict[str, object]]:
    """One node config per SuperNode: its partition, device profile and state folder
    (`run_local` adds its torch threads)."""
    from fedtune.profiles import get_profile

    for name in profiles:
        get_profile(name)  # an unknown name fails here, before any process starts
    return [{"partition-id": i, "num-partitions": nodes, "profile": profiles[i % len(profiles)], "state-dir": str(state_dir)} for i in range(nodes)]


def local_threads(nodes: int) -> int:
    """Torch threads for each of `nodes` SuperNodes on this machine: its cores shared among them."""
    return max(1, (os.cpu_count() or 1) // max(1, nodes))


def run_local(
    out: Path,
    nodes: int | list[dict[str, object]] = 2,
    config: str = "simulations/quickstart.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    profiles: list[str] | None = None,
    tls: bool = False,
    resume: bool = False,
    timeout: float = 1800.0,
    auth: bool = False,
    intruders: int = 0,
    on_started=None,
) -> dict:
    """Deploy on this machine, run to completion, stop everything; returns summary.json.

    `nodes` is a number of SuperNodes (node configs made by `node_configs` from `profiles`,
    default the config's) or the node configs themselves, one per SuperNode. With `auth`
    (needs `tls`) each SuperNode's public key is registered with the SuperLink before it
    starts; `intruders` extra SuperNodes with keys nobody registered are started too, to show
    they are refused. `on_started(deployment)` is called once `flwr run` is submitted.
    """
    from fedtune.runconfig import load_run_config
    from simulations.run import check_out

    out = out.resolve()
    count = nodes if isinstance(nodes, int) else len(nodes)
    overrides = run_overrides(config, overrides, count, profiles if isinstance(nodes, int) else None)
    cfg = load_run_config(config, overrides)
    check_out(out, resume, cfg)  # a folder holding another run is refused before any process starts
    if isinstance(nodes, int):
        nodes = node_configs(nodes, profiles or list(cfg.federation.profiles), out / "deploy" / "node-state")
    with Deployment(out / "deploy", tls=tls, auth=auth) as dep:
        dep.start_superlink()
        dep.write_connection()
        for node in nodes:
            dep.start_supernode({"threads": local_threads(len(nodes) + intruders), **node})
        for i in range(intruders):
            dep.start_supernode({"partition-id": i, "num-partitions": len(nodes)}, register=False)
        run_config = {"config": str(Path(config).resolve()), "overrides": ";".join(overrides), "out": str(out), "resume": resume}
        cmd = [_bin("flwr"), "run", str(app_dir()), CONNECTION, "--stream",
               "--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
        log = dep.workdir / "flwr-run.log"
        (dep.workdir / "flwr-run.cmd").write_text(shlex.join(cmd) + "\n")
        with open(log, "wb") as handle:
            run = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=dep.env, cwd=PROJECT, start_new_session=True)
            dep._watch(run.pid)  # taken down by the reaper too if the launcher is killed
            summary_path = out / "summary.json"
            start, end = time.time(), time.time() + timeout
            try:
                if on_started is not None:
                    on_started(dep)
                ended = None
                while time.time() < end:
                    dep.check_alive()
                    if summary_path.is_file() and summary_path.stat().st_mtime >= start:
                        break
                    if run.poll() not in (None, 0):
                        raise DeployError(f"`flwr run` failed with code {run.returncode}; see {log}:\n{_tail(log)}")
                    if run.poll() == 0:  # `flwr run --stream` ends with the run, also when its ServerApp failed
                        ended = ended or time.time()
                        if time.time() - ended > 10:
                            raise DeployError(f"the run ended without writing {summary_path}: its ServerApp failed; see {log}:\n{_tail(log)}")
                    time.sleep(0.5)
                else:
                    raise DeployError(f"the run did not finish within {timeout:.0f} s; logs in {dep.workdir}")
            finally:
                if run.poll() is None:
                    os.killpg(run.pid, signal.SIGTERM)
                    try:
                        run.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(run.pid, signal.SIGKILL)
                        run.wait()
        return json.loads(summary_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs", help="write a test CA and a SuperLink certificate")
    c.add_argument("folder")
    c.add_argument("--host", action="append", default=[], help="extra host name or IP the SuperLink is reached at")
    c.add_argument("--force", action="store_true", help="replace a CA the folder holds already")
    loc = sub.add_parser("local", help="SuperLink + SuperNodes on this machine, then `flwr run`")
    loc.add_argument("--nodes", type=int, default=2)
    loc.add_argument("--config", default="simulations/quickstart.yaml")
    loc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    loc.add_argument("--profiles", help="comma-separated device profiles, cycled over nodes (default: the config's)")
    loc.add_argument("--tls", action="store_true", help="generate certificates and use TLS")
    loc.add_argument("--auth", action="store_true", help="SuperNode authentication: register each node's public key (needs --tls)")
    loc.add_argument("--resume", action="store_true", help="continue the run in --out")
    loc.add_argument("--out", default="runs/deploy")
    loc.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "certs":
            for name, path in make_certs(Path(args.folder), args.host, overwrite=args.force).items():
                print(f"{name}: {path}")
            return 0
        profiles = args.profiles.split(",") if args.profiles else None
        summary = run_local(Path(args.out), args.nodes, args.config, args.set, profiles, args.tls, args.resume, args.timeout, auth=args.auth)
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    keys = ("rounds", "accuracy_global", "accuracy_personalized", "bytes_up_total", "wall_time_s")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    if summary.get("error"):  # the run ended without a result worth the name (as `fedtune simulate`, code 3)
        print(f"error: {summary['error']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
