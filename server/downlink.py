"""The sparse downlink: send each node only the global parameters it does not hold yet.

Clients keep the global model they last received (they train on it anyway). The server
numbers the global model's versions (a new version whenever a parameter changes) and
remembers, per parameter, the version in which it last changed, and per node, the
version that node holds (confirmed by its last successful reply). A node then gets the
parameters changed since its version, with `protocol.BASE_VERSION` (what the sent
arrays complete) and `protocol.MODEL_VERSION` (what it holds afterwards) in the
instruction's config. A node that answers that its copy is missing or another version
(`protocol.NEED_FULL_MODEL`) gets the whole model.

Every client can build the run's starting model itself (the public pretrained backbone
and the seeded initialisation the run config fixes), so with `initial_on_clients` a node the
server has not met yet is taken to hold version 0 when version 0 is that starting model:
the instruction carries version 0's checksum (`protocol.INITIAL_SHA256`), and a client whose
own build does not match asks for the whole model.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.supercore import log

FULL = -1  # BASE_VERSION of an instruction that carries the whole model


class Downlink:
    def __init__(self, sparse: bool, initial_on_clients: bool = False, first_version: int = 0) -> None:
        self.sparse = sparse
        self.initial_on_clients = initial_on_clients
        self.initial_sha256: str | None = None  # version 0's checksum, when clients may build it
        self.lost: set[int] = set()  # nodes that said they hold no usable copy
        # a resumed server numbers its versions from a random start (first_version): a client's
        # copy, or an instruction still queued, from the process before it never matches one of them
        self.version = first_version
        self.changed: dict[str, int] = {}  # parameter -> version in which it last changed
        self.held: dict[int, int] = {}  # node -> version it holds
        self._previous: dict[str, bytes] | None = None

    def observe(self, arrays: ArrayRecord) -> int:
        """Note the global arrays about to be sent; a new version if any parameter changed."""
        current = {name: bytes(array.data) for name, array in arrays.items()}
        if self._previous is None:
            self.changed = dict.fromkeys(current, self.version)
            if self.initial_on_clients:
                from fedtune.client_state import arrays_sha256

                self.initial_sha256 = arrays_sha256({n: a.numpy() for n, a in arrays.items()})
        else:
            moved = [n for n, data in current.items() if self._previous.get(n) != data]
            if moved:
                self.version += 1
                for name in moved:
                    self.changed[name] = self.version
        self._previous = current
        return self.version

    def payload(self, node_id: int, arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
        """What node `node_id` is sent of `arrays` (the current version), and its base version."""
        base = self.held.get(node_id)
        if base is None and self.initial_sha256 is not None and node_id not in self.lost:
            base = 0  # the node can build the starting model itself
        if not self.sparse or base is None or base > self.version:
            return arrays, FULL
        return ArrayRecord({n: a for n, a in arrays.items() if self.changed.get(n, self.version) > base}), base

    def delivered(self, node_id: int) -> None:
        """The node replied: it holds the current version."""
        self.held[node_id] = self.version
        self.lost.discard(node_id)

    def forget(self, node_id: int, why: str) -> None:
        """The node's copy is unknown (an error reply, or it says it lost it): send it everything next."""
        self.lost.add(node_id)
        if self.held.pop(node_id, None) is not None:
            log(20, "downlink: node %s gets the whole model next (%s)", node_id, why)
