"""Backbones: a timm ViT/DeiT with one classification head per task.

`FedViT` keeps timm's contract (forward = forward_features, then forward_head) and composes a
timm `VisionTransformer` (its own head removed) with an `nn.ModuleDict` of task
heads. Weights come from the timm hub (users online) or a local safetensors /
torch file; checkpoints are written as safetensors with the model config in
their metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import engine
from .errors import CheckpointError, ConfigError
from .report import replace_durably
from .typedconfig import from_dict, to_dict


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm ViT/DeiT name
    img_size: int = 32  # input resolution (square)
    patch_size: int = 4  # patch size; must divide img_size
    in_chans: int = 3  # image channels
    depth: int | None = None  # override the number of blocks (None: the timm default)
    embed_dim: int | None = None  # override the width (None: the timm default)
    num_heads: int | None = None  # override the attention heads (None: the timm default)
    mlp_ratio: float | None = None  # override the MLP ratio
    drop_path_rate: float = 0.0  # stochastic depth
    pretrained: str | None = None  # None | "hub" (timm hub weights) | path to .safetensors/.pt
    strict_pretrained: bool = False  # require every backbone key in the file

    def validate(self, prefix: str = "") -> None:
        if not any(s in self.name for s in ("vit", "deit")):
            raise ConfigError(f"{prefix}name: {self.name!r} is not a ViT/DeiT model name")
        if self.name.split(".", 1)[0] not in timm.list_models():  # a pretrained tag (name.augreg_in21k) picks hub weights
            close = [m for m in timm.list_models(self.name.split("_")[0] + "*")][:8]
            raise ConfigError(
                f"{prefix}name: unknown timm model {self.name!r}"
                + (f"; similar names: {', '.join(close)}" if close else "")
            )
        if self.img_size < 1 or self.patch_size < 1:
            raise ConfigError(f"{prefix}img_size/patch_size must be positive")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"{prefix}patch_size: {self.patch_size} does not divide img_size {self.img_size}"
            )
        if self.in_chans not in (1, 3):
            raise ConfigError(f"{prefix}in_chans: must be 1 or 3, got {self.in_chans}")
        for key in ("depth", "embed_dim", "num_heads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{prefix}{key}: must be >= 1, got {value}")
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ConfigError(f"{prefix}num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.mlp_ratio is not None and not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ConfigError(f"{prefix}mlp_ratio: must be a number > 0 or null (the model's own), got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"{prefix}drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")


def check_takes_images(model: ModelConfig, img_size: int, channels: int, prefix: str = "") -> None:
    """The model takes the images the data gives: its img_size and in_chans are the data's."""
    if model.img_size != img_size:
        raise ConfigError(f"{prefix}model.img_size ({model.img_size}) and data.img_size ({img_size}) differ: the model takes the images the data gives; set both")
    if model.in_chans != channels:
        raise ConfigError(f"{prefix}model.in_chans ({model.in_chans}) and data.channels ({channels}) differ: the model takes the images the data gives; set both")


def check_task_names(tasks) -> None:
    """Task names key the heads and the MoE routers (`heads.<task>.…`, `routers.<task>.…`):
    each must be a Python identifier that is not one of a ModuleDict's or ParameterDict's own
    attributes (`update`, `keys`, `train`, ...), or the model cannot be built or its parameters
    named; a ConfigError names the task."""
    reserved = set(dir(nn.ModuleDict)) | set(dir(nn.ParameterDict)) | set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict()))  # instances add `training`
    for t in tasks:
        if not isinstance(t, str) or not t.isidentifier() or t in reserved:
            raise ConfigError(
                f"task name {t!r}: a task name keys the model's heads and routers, so it must be an identifier "
                "(letters, digits, _; not starting with a digit) and not a reserved module attribute"
                + (" (it is one)" if t in reserved else "")
            )


class FedViT(nn.Module):
    """A timm ViT backbone plus one linear head per task (ModuleDict keyed by task)."""

    def __init__(self, vit: nn.Module, num_classes: dict[str, int]):
        super().__init__()
        if not num_classes:
            raise ConfigError("the model needs at least one task with its number of classes")
        check_task_names(num_classes)
        vit.reset_classifier(0)
        self.vit = vit
        self.heads = nn.ModuleDict({t: nn.Linear(vit.embed_dim, n) for t, n in num_classes.items()})
        self.consolidator: nn.Module | None = None  # SHERL attaches one

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def consolidate_at(self) -> int | None:
        """The block that takes SHERL's consolidated input (None: no consolidator)."""
        return None if self.consolidator is None else self.consolidator.num_inputs - 1

    def check_task(self, task: str | None) -> str:
        if task is None:
            return self.tasks[0]
        if task not in self.heads:
            raise ConfigError(f"unknown task {task!r}; the model has tasks: {', '.join(self.tasks)}")
        return task

    def block_fn(self, task: str | None, stats: list | None = None):
        """The engine's per-block function for `task` (None: engine.block_forward); the MoE ViT overrides it."""
        return None

    def forward_features(self, images: torch.Tensor, plan=None, task: str | None = None, trace=None) -> tuple[torch.Tensor, engine.Trace]:
        """Pre-logit features and what the forward observed (an engine.Trace: class-token
        deltas, tokens per block, and for the MoE ViT routing counts and the load-balancing
        loss in `aux_loss`). With a `plan` the engine runs it (trained, frozen and no-grad
        blocks, dropped or skipped tokens); without one, every block and every token: timm's
        own forward, which observes nothing, or with SHERL's consolidator the engine's dense
        path through it. `trace` is filled when given, else a new one."""
        trace = engine.Trace() if trace is None else trace
        if plan is None and self.consolidator is not None:
            plan = engine.dense_plan(self)
        if plan is None:
            return self.vit.forward_head(self.vit.forward_features(images), pre_logits=True), trace
        return engine.forward_features(self, images, plan, task, trace=trace), trace

    @property
    def survey_batches(self) -> int:
        """Batches the trainer looks at without autograd before training, for `experts_to_train`."""
        return 0

    def experts_to_train(self, traces: list) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(block, experts) that train this time, from what the survey's traces saw (a dense model: none)."""
        return ()

    def forward_head(self, feats: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """The task's logits from pre-logit features."""
        return self.heads[self.check_task(task)](feats)

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Plain dense forward (every block, every token): timm's forward with the task's head."""
        return self.forward_head(self.forward_features(x, task=task)[0], task)


def _timm_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=0,
        drop_path_rate=cfg.drop_path_rate,
    )
    for key in ("depth", "embed_dim", "num_heads", "mlp_ratio"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    return kwargs


def build_model(cfg: ModelConfig, num_classes: dict[str, int]) -> FedViT:
    """Build the timm backbone named by `cfg` and attach task heads; load pretrained weights."""
    cfg.validate("model.")
    hub = cfg.pretrained == "hub"
    try:
        vit = timm.create_model(cfg.name, pretrained=hub, **_timm_kwargs(cfg))
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"model: timm could not build {cfg.name!r} with {_timm_kwargs(cfg)}: {exc}") from exc
    except OSError as exc:  # the hub's weights: not downloadable here (offline, no such file) and not cached
        raise ConfigError(f"model.pretrained: hub: timm could not fetch the weights of {cfg.name!r} ({type(exc).__name__}: {exc}); "
                          "without internet, download them once elsewhere (they are cached under ~/.cache/huggingface) or give a "
                          "local file (model.pretrained: PATH.safetensors / .pth)") from exc
    if getattr(vit, "cls_token", None) is None or getattr(vit, "num_prefix_tokens", 1) != 1:
        # token dropping, skipping and the class-token deltas take token 0 as the class token and the rest as patches
        raise ConfigError(f"model.name: {cfg.name!r} has {getattr(vit, 'num_prefix_tokens', '?')} prefix token(s), "
                          f"{'one of them a' if getattr(vit, 'cls_token', None) is not None else 'and no'} class token; fedtune's token dropping "
                          "needs exactly one prefix token, the class token: use a ViT/DeiT without register or distillation tokens")
    model = FedViT(vit, num_classes)
    if cfg.pretrained and not hub:
        load_backbone(model, cfg.pretrained, strict=cfg.strict_pretrained)
    return model


# --------------------------------------------------------------------------- checkpoints


# Shipped weights written before files carried their tensors' checksum: the checksum, kept here
# so that they are verified as the newer ones are
UNSTAMPED_ASSETS = {"vit_tiny_p4_32_pretrained.safetensors": "bf4921e36c091203c60f55b2b72473278b1be0f43099a05c6ce0f7f2a02355c9"}


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors or torch weights file; any failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            # one read of one file: safetensors' lazy reader reopens the path per tensor, so a
            # checkpoint replaced while it was read (a run writing its next round) mixed two files
            with open(path, "rb") as fh:
                data = fh.read()
            state = load_safetensors(data)
            size = int.from_bytes(data[:8], "little")
            meta = dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
                obj = obj["model"]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"{path}: not a state dict of tensors")
            state = obj
        want = meta.get("sha256") or (UNSTAMPED_ASSETS.get(path.name) if _shipped_location(path) else None)
        if want is not None and tensors_sha256(state) != want:
            raise CheckpointError(f"{path}: checksum mismatch: its tensors are not the ones written (the file is damaged); restore it from a copy")
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors/pickle raise many types on corrupt files
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return state, meta


def _shipped_location(path: Path) -> bool:
    """Whether `path` lies where a shipped asset is looked for: an `assets` folder (the package's,
    wherever installed) or the cache's `pretrained` folder (an app bundle's fallback)."""
    from .weights import cache_dir

    try:
        cached = path.parent.resolve() == (cache_dir() / "pretrained").resolve()
    except OSError:
        cached = False
    return path.parent.name == "assets" or cached


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A checksum of named tensors: names, dtypes, shapes and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `state` as safetensors atomically (a temporary file renamed into place), with the
    tensors' checksum in its metadata (`sha256`; read_state verifies it)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    flat_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    flat_meta["sha256"] = tensors_sha256(state)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=flat_meta)
    replace_durably(tmp, path)
    return path


def checkpoint_meta(meta: dict[str, str]) -> dict[str, Any]:
    """Decode the JSON values written by `save_checkpoint`."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def _adapt_pos_embed(tensor: torch.Tensor, target: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """Resample a position embedding grid to the target's grid (for a different img/patch size)."""
    from timm.layers import resample_abs_pos_embed

    n_target = target.shape[1] - prefix_tokens
    side = int(math.isqrt(n_target))
    return resample_abs_pos_embed(tensor, new_size=(side, side), num_prefix_tokens=prefix_tokens)


def load_backbone(model: FedViT, path: str | Path, strict: bool = False) -> list[str]:
    """Load backbone weights (fedtune or plain timm key names) into `model.vit`.

    Heads are not loaded (tasks differ between pretraining and fine-tuning).
    A shape mismatch is an error naming the key; keys the file lacks are an
    error too when `strict`. Returns the names of backbone keys not in the file.
    """
    state, _ = read_state(path)
    own = model.vit.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        name = key[4:] if key.startswith("vit.") else key
        if name.startswith(("head.", "heads.", "fc_norm.")) and name not in own:
            continue
        if name not in own:
            unused.append(key)
            continue
        target = own[name]
        if value.shape != target.shape:
            if name == "pos_embed" and value.ndim == 3:
                value = _adapt_pos_embed(value, target, model.vit.num_prefix_tokens)
            else:
                raise CheckpointError(
                    f"{path}: shape mismatch for {name}: file has {tuple(value.shape)}, "
                    f"model has {tuple(target.shape)} (was it made for another model/img_size/patch_size?)"
                )
        loaded[name] = value.to(target.dtype)
    if not loaded:
        raise CheckpointError(f"{path}: no key matches the model {type(model.vit).__name__}; is it a ViT checkpoint?")
    missing = sorted(set(own) - set(loaded))
    if strict and missing:
        raise CheckpointError(f"{path}: missing backbone keys: {', '.join(missing[:5])}")
    if missing or unused:  # a partial load: the rest keeps its random initialization
        import warnings

        warnings.warn(f"{path}: loaded {len(loaded)} of the backbone's {len(own)} tensors; {len(missing)} keep their random initialization"
                      + (f" ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})" if missing else "")
                      + (f"; {len(unused)} of the file's are not the model's ({', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''})" if unused else "")
                      + (" (model.strict_pretrained: true makes missing tensors an error)" if missing else ""), stacklevel=2)
    model.vit.load_state_dict(loaded, strict=False)
    return missing


def model_meta(cfg: ModelConfig, num_classes: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {"format": "fedtune", "model": to_dict(cfg), "num_classes": num_classes, **extra}


def model_from_checkpoint(path: str | Path) -> tuple[FedViT, dict[str, Any]]:
    """Rebuild a FedViT from a checkpoint written with `model_meta` metadata."""
    state, raw = read_state(path)
    meta = checkpoint_meta(raw)
    if meta.get("format") != "fedtune" or "model" not in meta:
        raise CheckpointError(f"{path}: not a fedtune checkpoint (no model config in its metadata)")
    cfg = from_dict(ModelConfig, {**meta["model"], "pretrained": None})
    model = build_model(cfg, meta["num_classes"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("consolidator")]:
        raise CheckpointError(f"{path}: does not match its model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, meta

