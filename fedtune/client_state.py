"""What a client keeps between rounds (never sent), and its one on-disk format.

A client's state is its personal parameters (`federation.personal` prefixes and the
personal heads, under `personal_head.<task>.`) and its planner's `state_dict` (ALaST:
budgets and importance). On a device it is written after every round as
`round-NNNNNN.npz` in the client's folder: the arrays, plus a JSON `__meta__` entry that
names the run (the server's run token, kept across --resume). The client app reads it back
after a restart; `fedtune export --client` reads it too. A device's folder outlives a run:
files of another run are never read as this run's, nor pruned as its older rounds; the
first write of a new run moves them into `other-runs/<token>/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .protocol import valid_run_token
from .report import replace_durably

PERSONAL_HEAD = "personal_head."
PERSONAL_MODEL = "personal_model."  # Ditto: the client's whole personal model, every entry of the model's state_dict under this prefix
KEEP_FILES = 2  # rounds kept on disk: the newest, and one before it for a repeated round


@dataclass
class ClientState:
    personal: dict[str, np.ndarray] = field(default_factory=dict)  # personal parameters and personal heads
    method: dict[str, Any] = field(default_factory=dict)  # the planner's state_dict (ALaST: budgets, importance)


OTHER_RUNS = "other-runs"  # where a folder's files of earlier runs are set aside


def state_meta(state: ClientState, server_round: int, run: str | None = None) -> dict[str, Any]:
    """The JSON part of a saved state (`run`: the run token; None outside a federation)."""
    return {"method": state.method, "round": server_round, **({"run": run} if run else {})}


def state_from(personal: dict[str, np.ndarray], meta: dict[str, Any]) -> ClientState:
    """A state from its arrays and JSON part (files of earlier versions kept budgets and importance at the top)."""
    method = meta.get("method")
    if method is None:
        method = {k: meta[k] for k in ("budgets", "importance") if meta.get(k) is not None}
    return ClientState(personal=personal, method=dict(method))


def personal_params(personal: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's personal parameters (everything but the personal heads and a Ditto personal model)."""
    return {k: v for k, v in personal.items() if not k.startswith((PERSONAL_HEAD, PERSONAL_MODEL))}


def personal_model(personal: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's own whole model (Ditto), under the model's names (empty when it has none)."""
    return {k.removeprefix(PERSONAL_MODEL): v for k, v in personal.items() if k.startswith(PERSONAL_MODEL)}


def personal_head(personal: dict[str, np.ndarray], task: str) -> dict[str, torch.Tensor]:
    """The state_dict of `task`'s personal head (empty when the client has none)."""
    prefix = f"{PERSONAL_HEAD}{task}."
    return {k.removeprefix(prefix): torch.as_tensor(v) for k, v in personal.items() if k.startswith(prefix)}


def personal_head_tasks(personal: dict[str, np.ndarray]) -> list[str]:
    return sorted({k.split(".")[1] for k in personal if k.startswith(PERSONAL_HEAD)})


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """A checksum of named arrays (names, dtypes, shapes, bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_run(path: Path) -> str | None:
    """The run token a state file was written in: "" for a file that names no run (written
    outside a federation, or before run tokens), None when its metadata does not read (a
    damaged file, which read_client_state then reports)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            run = json.loads(str(z["__meta__"])).get("run", "")
    except (OSError, ValueError, KeyError, EOFError, AttributeError, zipfile.BadZipFile):
        return None
    if run == "":
        return ""
    return run if valid_run_token(run) else "unnamed"  # a tampered name never becomes a path


_ROUND_FILE = re.compile(r"round-\d+\.npz")


def round_files(folder: Path) -> list[Path]:
    """The files `folder` holds named as write_client_state names them, oldest first (a copy a
    user or a sync tool made, round-000003 (1).npz, is not one)."""
    return sorted(f for f in folder.glob("round-*.npz") if _ROUND_FILE.fullmatch(f.name)) if folder.is_dir() else []


def state_files(folder: Path, before_round: int | None = None, run: str | None = None) -> list[Path]:
    """The saved rounds in `folder`, oldest first (only those before `before_round` when given;
    with `run`, only that run's, and damaged ones, which the reader reports)."""
    files = round_files(folder)
    if before_round is not None:
        files = [f for f in files if int(f.stem.split("-")[1]) < before_round]
    if run is not None:
        files = [f for f in files if file_run(f) in (None, run)]  # None: unreadable metadata
    return files


def claim_folder(folder: Path, run: str) -> None:
    """Make `folder` run `run`'s: files of other runs go into other-runs/<token>/ (with a
    warning), and files of `run` set aside earlier (another run used the folder in between,
    then this one resumed) come back."""
    if not folder.is_dir():
        return
    for other in round_files(folder):
        theirs = file_run(other)
        if theirs not in (None, run):
            aside = folder / OTHER_RUNS / (theirs or "unnamed")
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(other, aside / other.name)
            warnings.warn(f"client state {other} is from another run ({theirs}): moved into {aside}", stacklevel=3)
    if valid_run_token(run):
        mine = folder / OTHER_RUNS / run
        for back in round_files(mine):
            os.replace(back, folder / back.name)
            warnings.warn(f"client state {back.name} of this run, set aside while another run used {folder}, is back in use", stacklevel=3)


def write_client_state(folder: Path, state: ClientState, server_round: int, keep: int = KEEP_FILES, run: str | None = None) -> Path:
    """Write `state` as the file of `server_round` of `run` atomically; keep the newest `keep`
    rounds of the run (at least KEEP_FILES: a server that checkpoints every N rounds may
    repeat the last N after a crash, so it needs N + 1). Files another run left in the
    folder are moved into other-runs/<token>/ first, with a warning."""
    folder.mkdir(parents=True, exist_ok=True)
    if run is not None:
        claim_folder(folder, run)
    path = folder / f"round-{server_round:06d}.npz"
    tmp = folder / f"tmp-{server_round:06d}.npz"
    np.savez(tmp, __meta__=np.array(json.dumps(state_meta(state, server_round, run))), __sha256__=np.array(arrays_sha256(state.personal)), **state.personal)
    replace_durably(tmp, path)
    for stray in folder.glob("tmp-*.npz"):  # left by a write a crash cut short (one writer per folder)
        if stray.name != f"tmp-{GLOBAL_COPY}":
            stray.unlink(missing_ok=True)
    # keep the newest `keep` files that read whole (a damaged file never counts as one of them,
    # or a round repeated after a crash could find no state to start from); drop what is older
    files, kept = state_files(folder, run=run), 0
    for i in range(len(files) - 1, -1, -1):
        kept += files[i] == path or _intact(files[i])  # the file just written is whole
        if kept == max(KEEP_FILES, keep):
            for old in files[:i]:
                old.unlink(missing_ok=True)
            break
    return path


_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what reading a damaged state file raises


def _read_state_file(path: Path) -> ClientState:
    """One state file, checked against its checksum; a damaged one raises one of _DAMAGED."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        personal = {k: z[k] for k in z.files if k not in ("__meta__", "__sha256__")}
        if "__sha256__" in z.files and str(z["__sha256__"]) != arrays_sha256(personal):
            raise ValueError("checksum mismatch (the file is damaged)")
    method = meta.get("method") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or (method is not None and not isinstance(method, dict)):  # the checksum covers the arrays, not this
        raise ValueError("its metadata is not a state's")
    return state_from(personal, meta)


def _intact(path: Path) -> bool:
    try:
        _read_state_file(path)
    except _DAMAGED:
        return False
    return True


def read_client_state(folder: Path, before_round: int | None = None, run: str | None = None, claim: bool = False,
                      strict: bool = False) -> ClientState | None:
    """The newest readable state saved in `folder` (before `before_round`; with `run`, of that
    run only; with `claim`, the client's own reading, after claim_folder: a reader such as
    export leaves the folder as it is), or None when there is none. A damaged newest file
    is skipped, with a warning, for the one kept before it (a client repeating a round);
    with `strict` it is an error (export: an older round's state would not be the model the
    run evaluated)."""
    if run is not None and claim:
        claim_folder(folder, run)
    files = state_files(folder, before_round, run)
    if not files:
        return None
    errors = []
    for path in reversed(files):
        try:
            state = _read_state_file(path)
        except _DAMAGED as exc:
            if strict:
                raise CheckpointError(f"corrupt client state {path}: {exc}") from exc
            errors.append(f"{path}: {exc}")
            warnings.warn(f"corrupt client state {path} ({exc}); trying the one before it", stacklevel=2)
            continue
        return state
    raise CheckpointError(f"corrupt client state, every file unreadable: {'; '.join(errors)}")


GLOBAL_COPY = "global-model.npz"  # the global model a client holds (the sparse downlink), beside its state files


def write_global_copy(folder: Path, arrays: dict[str, np.ndarray], version: int, run: str | None = None) -> Path:
    """Keep the global model the client holds, with its version (and run token), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / GLOBAL_COPY, folder / f"tmp-{GLOBAL_COPY}"
    np.savez(tmp, __version__=np.array(version), __run__=np.array(run or ""), **arrays)
    replace_durably(tmp, path)
    return path


def read_global_copy(folder: Path, run: str | None = None) -> tuple[dict[str, np.ndarray], int] | None:
    """The global model the client holds and its version; None when it has none, the file is
    damaged, or, with `run`, it was kept in another run (the server then sends the whole model)."""
    path = folder / GLOBAL_COPY
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            theirs = str(z["__run__"]) if "__run__" in z.files else ""
            if run is not None and theirs and theirs != run:
                warnings.warn(f"global model copy {path} is from another run ({theirs}): not used", stacklevel=2)
                return None
            return {k: z[k] for k in z.files if k not in ("__version__", "__run__")}, int(z["__version__"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"damaged global model copy {path} ({exc}); asking the server for the whole model", stacklevel=2)
        return None
