"""Device profiles: how much memory and compute a device gives to fine-tuning.

`memory_bytes` bounds what training adds on top of the frozen weights: the
activations saved for backward at the configured batch size plus the
gradients and optimizer state of the trainable parameters. `flops_per_sample`
bounds the training FLOPs (forward + backward) per sample. The numbers are
working budgets for fine-tuning on such a device (what is left next to the OS,
the runtime and the frozen weights), not its total RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

MiB = 1 << 20
GFLOP = 10**9


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int  # activations + trainable state, bytes
    flops_per_sample: float  # training FLOPs per sample
    description: str = ""

    def validate(self, prefix: str = "") -> None:
        if self.memory_bytes <= 0:
            raise ConfigError(f"{prefix}memory_bytes: must be positive, got {self.memory_bytes}")
        if self.flops_per_sample <= 0:
            raise ConfigError(f"{prefix}flops_per_sample: must be positive, got {self.flops_per_sample}")


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in [
        DeviceProfile(
            "mcu",
            memory_bytes=1 * MiB,
            flops_per_sample=1.0 * GFLOP,
            description="microcontroller-class board (Cortex-M7/ESP32-S3, ~1 MiB SRAM + PSRAM): a linear probe at most",
        ),
        DeviceProfile(
            "rpi",
            memory_bytes=24 * MiB,
            flops_per_sample=1.0 * GFLOP,
            description="Raspberry Pi 4/5-class board (4-core Cortex-A72/A76, 4 GB shared RAM, ~10 GFLOP/s)",
        ),
        DeviceProfile(
            "phone",
            memory_bytes=64 * MiB,
            flops_per_sample=1.4 * GFLOP,
            description="mid-range phone (8-core ARM, app memory limit of a few hundred MB shared with the UI)",
        ),
        DeviceProfile(
            "jetson",
            memory_bytes=160 * MiB,
            flops_per_sample=2.0 * GFLOP,
            description="Jetson Nano/Orin Nano-class board (4-8 GB shared CPU/GPU memory, tens of GFLOP/s)",
        ),
        DeviceProfile(
            "workstation",
            memory_bytes=16 * 1024 * MiB,
            flops_per_sample=1e15,
            description="desktop GPU or server: no practical limit for these models",
        ),
    ]
}


AUTO = "auto"  # measure this device instead of naming a profile
UNLIMITED = DeviceProfile("unlimited", memory_bytes=1 << 62, flops_per_sample=1e30, description="no limit (the bench's methods, compared as planned)")


def proc_kib_field(path: str, key: str) -> int | None:
    """A `key:  N kB` line of a Linux /proc file, in bytes (None where there is none)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_left(folder: Path, files: tuple[str, str, str, str]) -> int | None:
    """What one cgroup folder's memory limit leaves (None: no limit set, or none readable)."""
    limit_file, usage_file, stat_file, cache_key = files
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "no limit" as a number near 2^63
        return None
    cache = 0
    try:
        for line in (folder / stat_file).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
    except (OSError, ValueError):
        pass
    return max(int(limit) - max(usage - cache, 0), 0)


_V2 = ("memory.max", "memory.current", "memory.stat", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")


def _own_cgroups(root: Path, proc_cgroup: Path) -> list[tuple[Path, tuple[str, str, str, str]]]:
    """The folders of this process's cgroup and of each parent up to the hierarchy's root, v2's
    unified one and v1's memory controller's (/proc/self/cgroup names them; without a cgroup
    namespace the process's own folder lies below the root, not at it)."""
    found = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, files = root, _V2
        elif "memory" in controllers.split(","):
            base, files = root / "memory", _V1
        else:
            continue
        rel = Path(path.lstrip("/"))
        for ancestor in [rel, *rel.parents]:
            found.append((base / ancestor, files))
    return found + [(root, _V2), (root / "memory", _V1)]


def cgroup_available_bytes(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """What the memory limits of this process's container (Linux cgroups, v2 or v1) leave it:
    for its own cgroup and each parent, the limit less the usage, the usage without the
    inactive file cache the kernel reclaims before it kills anything (as docker and the
    kubelet count it); the smallest of them, or None where no limit is set or none can be read."""
    left = [v for folder, files in _own_cgroups(root, proc_cgroup) if (v := _cgroup_left(folder, files)) is not None]
    return min(left) if left else None


def available_memory_bytes() -> int:
    """Memory this device has available now: Linux MemAvailable (else free physical pages, else
    psutil's figure, as on macOS and Windows), and no more than its container's memory limit leaves."""
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            try:
                import psutil

                available = int(psutil.virtual_memory().available)
            except (ImportError, OSError, AttributeError):
                raise ConfigError("profile 'auto': cannot measure this device's available memory; name a profile instead") from None
    limited = cgroup_available_bytes()
    return available if limited is None else min(available, limited)


def measured_profile(share: float = 0.25) -> DeviceProfile:
    """A profile for the device this runs on: `share` of its available memory for training
    (the rest stays with the OS, the runtime and the frozen weights); compute is not capped,
    since time per round, not FLOPs per sample, is what a measured device can promise."""
    available = available_memory_bytes()
    return DeviceProfile(AUTO, memory_bytes=max(int(available * share), 1), flops_per_sample=1e15,
                         description=f"measured: {share:.2%} of {available / MiB:.0f} MiB available")


def simulated_auto_profile(cpus_per_client: float, clients: int) -> DeviceProfile:
    """"auto" for a simulated client, which shares this machine: its share of a quarter of the
    memory, over the clients Ray runs at once (the CPUs this process may use over each
    client's, and no more than the clients there are)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    together = max(1, min(int(cpus // max(cpus_per_client, 1e-9)), clients))
    return measured_profile(0.25 / together)


def get_profile(name: str | DeviceProfile | None) -> DeviceProfile:
    """A named profile (or the profile itself); None means the unconstrained workstation,
    "auto" a profile measured on this device (`measured_profile`)."""
    if isinstance(name, DeviceProfile):
        return name
    if name is None:
        return PROFILES["workstation"]
    if name == AUTO:
        return measured_profile()
    if name not in PROFILES:
        raise ConfigError(f"unknown device profile {name!r}; known profiles: {', '.join(PROFILES)}, or {AUTO!r} to measure this device")
    return PROFILES[name]
