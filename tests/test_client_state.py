"""The client-state format: one file per round, read back by the client app and by export."""

import json

import numpy as np
import pytest

from fedtune.client_state import (
    ClientState,
    personal_head,
    personal_head_tasks,
    personal_params,
    read_client_state,
    write_client_state,
)
from fedtune.errors import CheckpointError


def test_round_trip_keeps_the_newest_rounds(tmp_path):
    personal = {"vit.norm.weight": np.arange(3, dtype=np.float32), "personal_head.digit.weight": np.ones((2, 3), np.float32)}
    for r in (1, 2, 3):
        write_client_state(tmp_path, ClientState(personal={k: v * r for k, v in personal.items()}, method={"budgets": [r, r]}), r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000002.npz", "round-000003.npz"]
    state = read_client_state(tmp_path)
    assert state.method == {"budgets": [3, 3]}
    np.testing.assert_array_equal(state.personal["vit.norm.weight"], personal["vit.norm.weight"] * 3)
    # a repeated round reads the state from before it
    assert read_client_state(tmp_path, before_round=3).method == {"budgets": [2, 2]}
    assert read_client_state(tmp_path, before_round=2) is None
    assert read_client_state(tmp_path / "missing") is None
    assert set(personal_params(state.personal)) == {"vit.norm.weight"}
    assert set(personal_head(state.personal, "digit")) == {"weight"} and personal_head(state.personal, "parity") == {}
    assert personal_head_tasks(state.personal) == ["digit"]


def test_a_write_cut_short_leaves_no_stray_file(tmp_path):
    """A crash between writing the temporary file and renaming it leaves `tmp-NNNNNN.npz`;
    the next round's write removes it (and never reads it as a state)."""
    write_client_state(tmp_path, ClientState(method={"budgets": [1]}), 1)
    (tmp_path / "tmp-000002.npz").write_bytes(b"cut short")
    (tmp_path / "tmp-global-model.npz").write_bytes(b"the global copy's own temporary file")
    assert read_client_state(tmp_path).method == {"budgets": [1]}
    write_client_state(tmp_path, ClientState(method={"budgets": [3]}), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001.npz", "round-000003.npz", "tmp-global-model.npz"]


def test_a_copy_of_a_state_file_under_another_name_is_not_read_as_a_round(tmp_path):
    """A sync tool's or a user's copy (round-000001 (1).npz) neither stops the client nor counts as a state."""
    write_client_state(tmp_path, ClientState(method={"budgets": [1]}), 1)
    (tmp_path / "round-000001 (1).npz").write_bytes((tmp_path / "round-000001.npz").read_bytes())
    assert read_client_state(tmp_path, before_round=5).method == {"budgets": [1]}
    with pytest.warns(UserWarning, match="round-000001.npz is from another run"):  # the copy is not moved: it is no state file
        write_client_state(tmp_path, ClientState(method={"budgets": [2]}), 2, run="a" * 32)
    assert read_client_state(tmp_path, run="a" * 32).method == {"budgets": [2]}
    assert (tmp_path / "round-000001 (1).npz").exists(), "left as the user made it"


def test_earlier_files_and_corrupt_files(tmp_path):
    # files written before the planner state had its own key kept budgets and importance at the top
    np.savez(tmp_path / "round-000001.npz", __meta__=np.array(json.dumps({"budgets": [0.5], "importance": None, "rounds": 1, "round": 1})))
    assert read_client_state(tmp_path).method == {"budgets": [0.5]}
    (tmp_path / "round-000002.npz").write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="corrupt client state .*round-000002.npz"):
        assert read_client_state(tmp_path).method == {"budgets": [0.5]}  # the file kept before it
    (tmp_path / "round-000001.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="every file unreadable: .*round-000002.npz.*round-000001.npz"), pytest.warns(UserWarning):
        read_client_state(tmp_path)


def test_a_truncated_newest_file_falls_back(tmp_path):
    for r in (1, 2):
        write_client_state(tmp_path, ClientState(method={"budgets": [float(r)]}), r)
    newest = tmp_path / "round-000002.npz"
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    with pytest.warns(UserWarning, match="round-000002.npz"):
        assert read_client_state(tmp_path).method == {"budgets": [1.0]}


def test_a_state_file_whose_bytes_changed_falls_back_to_the_previous_one(tmp_path):
    import warnings as _w

    from fedtune.client_state import ClientState, read_client_state, write_client_state

    write_client_state(tmp_path, ClientState(personal={"w": np.zeros(4, np.float32)}), 1)
    newest = write_client_state(tmp_path, ClientState(personal={"w": np.ones(4, np.float32)}), 2)
    # a file rewritten with other data but the old checksum (the zip itself is intact)
    with np.load(newest) as z:
        parts = {k: z[k] for k in z.files}
    parts["w"] = parts["w"] + 1
    np.savez(newest, **parts)
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        state = read_client_state(tmp_path)
    assert np.array_equal(state.personal["w"], np.zeros(4, np.float32))
    assert any("checksum mismatch" in str(w.message) for w in caught)


def test_a_server_that_checkpoints_every_n_rounds_finds_the_state_it_repeats_from(tmp_path):
    """With checkpoints every 3 rounds a crash in round 6 repeats rounds 4-6: the client keeps
    4 rounds, so the state before round 4 (written in round 3) is still there."""
    for r in range(1, 7):
        write_client_state(tmp_path, ClientState(method={"budgets": [float(r)]}), r, keep=4)
    assert [p.name for p in sorted(tmp_path.glob("round-*.npz"))] == [f"round-00000{r}.npz" for r in (3, 4, 5, 6)]
    assert read_client_state(tmp_path, before_round=4).method == {"budgets": [3.0]}
    for r in range(7, 9):
        write_client_state(tmp_path, ClientState(), r)  # the default keeps the newest 2
    assert [p.name for p in sorted(tmp_path.glob("round-*.npz"))] == ["round-000007.npz", "round-000008.npz"]


def test_a_devices_state_folder_keeps_each_runs_files_apart(tmp_path):
    """A device keeps one state-dir across runs: a new run reads nothing of the last one (nor
    of files that name no run), and its first write sets the other run's files aside instead
    of pruning its own newer round as the older one."""
    import warnings as _w

    from fedtune.client_state import OTHER_RUNS

    for r in range(1, 6):
        write_client_state(tmp_path, ClientState(personal={"h": np.full(2, 100.0 + r)}), r, run="old")
    write_client_state(tmp_path / "legacy", ClientState(personal={"h": np.zeros(2)}), 9)
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        assert read_client_state(tmp_path, before_round=6, run="new") is None
        assert read_client_state(tmp_path / "legacy") is not None and read_client_state(tmp_path / "legacy", run="new") is None
        write_client_state(tmp_path, ClientState(personal={"h": np.ones(2)}), 1, run="new")
    assert any("from another run (old)" in str(w.message) for w in caught)
    assert [p.name for p in tmp_path.glob("round-*.npz")] == ["round-000001.npz"]
    assert sorted(p.name for p in (tmp_path / OTHER_RUNS / "old").glob("*.npz")) == [f"round-00000{r}.npz" for r in (4, 5)], "set aside, not deleted"
    assert np.array_equal(read_client_state(tmp_path, before_round=2, run="new").personal["h"], np.ones(2))
    write_client_state(tmp_path, ClientState(personal={"h": np.full(2, 2.0)}), 2, run="new")
    assert np.array_equal(read_client_state(tmp_path, before_round=5, run="new").personal["h"], np.full(2, 2.0))
    assert read_client_state(tmp_path / OTHER_RUNS / "old", run="old").personal["h"][0] == 105.0, "the old run's newest state is still there"
    write_client_state(tmp_path, ClientState(), 7, run="../../evil")  # a tampered run name never becomes a path
    with _w.catch_warnings(record=True):
        _w.simplefilter("always")
        write_client_state(tmp_path, ClientState(), 3, run="new")
    assert [p.name for p in (tmp_path / OTHER_RUNS / "unnamed").glob("*.npz")] == ["round-000007.npz"]


def test_a_run_resumed_after_another_used_the_folder_gets_its_state_back(tmp_path):
    """Run A, then run B in the same state-dir (A's files set aside), then A resumed: A reads
    its own newest round again, and B's files are set aside in turn."""
    from fedtune.client_state import OTHER_RUNS

    with pytest.warns(UserWarning):
        for r in (1, 2):
            write_client_state(tmp_path, ClientState(personal={"h": np.full(2, float(r))}), r, run="A")
        write_client_state(tmp_path, ClientState(personal={"h": np.full(2, 10.0)}), 1, run="B")
        assert read_client_state(tmp_path, before_round=3, run="A") is None, "a reader (export) moves nothing"
        state = read_client_state(tmp_path, before_round=3, run="A", claim=True)  # the client app's reading
    assert state is not None and state.personal["h"][0] == 2.0
    assert sorted(p.name for p in tmp_path.glob("round-*.npz")) == ["round-000001.npz", "round-000002.npz"]
    assert [p.name for p in (tmp_path / OTHER_RUNS / "B").glob("*.npz")] == ["round-000001.npz"]
    assert not list((tmp_path / OTHER_RUNS / "A").glob("*.npz"))


def test_a_damaged_file_does_not_count_among_the_kept_rounds(tmp_path):
    """Pruning keeps the newest `keep` readable rounds: a damaged round-2 does not push out
    round 1, the state a repeated round 2 would read."""
    write_client_state(tmp_path, ClientState(method={"budgets": [1.0]}), 1)
    (tmp_path / "round-000002.npz").write_bytes(b"damaged")
    write_client_state(tmp_path, ClientState(method={"budgets": [3.0]}), 3)
    assert sorted(p.name for p in tmp_path.glob("round-*.npz")) == ["round-000001.npz", "round-000002.npz", "round-000003.npz"]
    with pytest.warns(UserWarning, match="round-000002.npz"):
        assert read_client_state(tmp_path, before_round=3).method == {"budgets": [1.0]}
    write_client_state(tmp_path, ClientState(method={"budgets": [4.0]}), 4)  # rounds 3 and 4 kept; what is older goes
    assert sorted(p.name for p in tmp_path.glob("round-*.npz")) == ["round-000003.npz", "round-000004.npz"]
    # a file whose metadata reads but whose arrays changed (its checksum fails) does not count either
    write_client_state(tmp_path, ClientState(personal={"w": np.zeros(3, np.float32)}), 5)
    with np.load(tmp_path / "round-000005.npz") as z:
        parts = {k: z[k] for k in z.files}
    np.savez(tmp_path / "round-000005.npz", **{**parts, "w": np.ones(3, np.float32)})
    write_client_state(tmp_path, ClientState(method={"budgets": [6.0]}), 6)
    assert sorted(p.name for p in tmp_path.glob("round-*.npz")) == ["round-000004.npz", "round-000005.npz", "round-000006.npz"]


def test_strict_reading_and_hand_edited_metadata(tmp_path):
    """Export reads strictly: a damaged newest file is an error naming it, not an older round.
    Metadata that is JSON but not a state's is a damaged file, not a traceback."""
    write_client_state(tmp_path, ClientState(method={"budgets": [1.0]}), 1)
    newest = write_client_state(tmp_path, ClientState(method={"budgets": [2.0]}), 2)
    with np.load(newest) as z:
        parts = {k: z[k] for k in z.files}
    np.savez(newest, **{**parts, "__meta__": np.array(json.dumps(["not", "a", "dict"]))})
    with pytest.raises(CheckpointError, match="corrupt client state .*round-000002.npz: its metadata is not a state's"):
        read_client_state(tmp_path, strict=True)
    with pytest.warns(UserWarning, match="round-000002.npz"):
        assert read_client_state(tmp_path).method == {"budgets": [1.0]}
    for method in ([1, 2], 0, False):
        np.savez(newest, **{**parts, "__meta__": np.array(json.dumps({"method": method, "round": 2}))})
        with pytest.raises(CheckpointError, match="its metadata is not a state's"):
            read_client_state(tmp_path, strict=True)
