"""Device profiles: how much memory and compute a device gives to fine-tuning.

`memory_bytes` bounds what training adds on top of the frozen weights: the
activations saved for backward at the configured batch size plus the
gradients and optimizer state of the trainable parameters. `flops_per_sample`
bounds the training FLOPs (forward + backward) per sample. The numbers are
working budgets for fine-tuning on such a device (what is left next to the OS,
the runtime and the frozen weights), not its total RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def get_profile(name: str | DeviceProfile | None) -> DeviceProfile:
    """A named profile (or the profile itself); None means the unconstrained workstation."""
    if isinstance(name, DeviceProfile):
        return name
    if name is None:
        return PROFILES["workstation"]
    if name not in PROFILES:
        raise ConfigError(f"unknown device profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[name]
