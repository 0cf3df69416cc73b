"""Export a personalized model for one task, and predict with it.

`export_run(run_dir, task, client, out)` reads a run's final checkpoint (and,
with a client, that client's personal state) and writes a self-contained
folder:

- `model.safetensors`: the weights. A dense model uses plain timm key names
  (the task's head as timm's `head`), so `timm.create_model(name, **config)`
  loads them; an MoE model keeps only the experts the task's router uses; a
  SHERL model (kind `sherl`; an MoE one stays `moe`) adds its consolidator's
  weights (`consolidator.*`), which timm's forward has no place for; export.json reports how often an MoE or
  SHERL export's predictions agree with the run's own model;
- `config.yaml`: what is needed to rebuild and feed the model (timm name and
  kwargs, classes, normalisation, the source run);
- `model.onnx`: the model (images -> logits, any batch size) for onnxruntime or any ONNX
  runtime, without fedtune, timm or torch; the export checks it against the framework's
  own predictions before it returns.

`predict(dir, images)` runs that folder's ONNX model with onnxruntime alone.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .client import PERSONAL_PARAM_MODES
from .client_state import (
    personal_head,
    personal_head_tasks,
    personal_model,
    personal_params,
    read_client_state,
    state_files,
)
from .data import PIXEL_MEAN, PIXEL_STD
from .engine import dense_plan
from .errors import CheckpointError, ConfigError
from .heads import ABSENT_CLASS_BIAS
from .lora import has_lora, merge_lora
from .model import FedViT, checkpoint_meta, read_state, save_checkpoint
from .report import replace_durably


class DenseMoE(nn.Module):
    """Inference form of an MoE MLP without data-dependent shapes (traceable): every kept
    expert runs on every token and the top-k gates (zero elsewhere) combine them. With no
    capacity limit this equals the routed computation."""

    def __init__(self, layer: nn.Module, task: str):
        super().__init__()
        self.experts = layer.experts
        self.shared_experts = layer.shared_experts
        self.router: nn.Module | None = None
        self.task_embed = None
        if len(self.experts) > 1 or len(self.shared_experts):  # one kept expert alone needs no router
            self.router = copy.deepcopy(layer.routers[task]) if layer.router_kind == "per_task" else copy.deepcopy(layer.router)
            self.task_embed = None if layer.router_kind == "per_task" else nn.Parameter(layer.task_embed[task].detach().clone())
        self.top_k = layer.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return self.experts[0](x)  # one kept expert: its gate is 1 for every token, a dense MLP
        flat = x.reshape(-1, x.shape[-1])
        inp = flat if self.task_embed is None else torch.cat([flat, self.task_embed.to(flat.dtype).expand(flat.shape[0], -1)], dim=-1)
        logits = self.router(inp).float()
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, idx, top.softmax(dim=-1))
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + gates[:, e : e + 1].to(flat.dtype) * expert(flat)
        for expert in self.shared_experts:  # always on (moe.shared_experts)
            out = out + expert(flat)
        return (out / (len(self.shared_experts) + 1)).view(x.shape)


class TaskModel(nn.Module):
    """images -> logits of one task: the backbone, its (MoE-densified) MLPs and one head; a
    SHERL model's consolidator between its early and late blocks, as it trained."""

    def __init__(self, vit: nn.Module, head: nn.Module, consolidator: nn.Module | None = None):
        super().__init__()
        self.vit = vit
        self.head = head
        self.consolidator = consolidator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.consolidator is None:
            return self.head(self.vit.forward_head(self.vit.forward_features(images), pre_logits=True))
        vit, at = self.vit, self.consolidator.num_inputs - 1
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        early = [x]  # the embedding output, then each early block's
        for i, blk in enumerate(vit.blocks):
            if i == at:
                x = self.consolidator(early)
            x = blk(x)
            if i < at:
                early.append(x)
        return self.head(vit.forward_head(vit.norm(x), pre_logits=True))


def _dense_vit(cfg: Any) -> nn.Module:
    """A dense ViT of the run's model shape (random weights: for its size and FLOPs)."""
    from dataclasses import replace

    from .model import build_model

    return build_model(replace(cfg.model, pretrained=None), {"task": 2}).vit


def _run_model(run_dir: Path) -> tuple[FedViT, dict[str, Any]]:
    from .federated import global_model, load_numpy_state
    from .typedconfig import from_dict

    path = run_dir / "checkpoint.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint.safetensors (is it a fedtune run folder?)")
    state, raw = read_state(path)
    meta = checkpoint_meta(raw)
    if "run" not in meta:
        raise CheckpointError(f"{path}: not a run checkpoint (no run config in its metadata)")
    from .runconfig import RunConfig

    cfg = from_dict(RunConfig, meta["run"])
    from dataclasses import replace

    # the run's shape without its pretrained file (the checkpoint holds every weight): an
    # export works where that file, or the hub, is not at hand
    model = global_model(replace(cfg, model=replace(cfg.model, pretrained=None)))
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} of the run model's tensors ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                              "is it a complete run checkpoint?")
    load_numpy_state(model, {k: v.numpy() for k, v in state.items()}, f"checkpoint {path}")
    return model, {"cfg": cfg, "meta": meta}


def _next_round(meta: dict[str, Any]) -> int | None:
    rnd = meta.get("round")
    return rnd + 1 if isinstance(rnd, int) else None


def _client_state(run_dir: Path, client: int, run: str | None = None, before_round: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The client's personal state as of the checkpoint (a damaged file is an error: an older
    round's state is not what the run evaluated) and the round it was saved in."""
    folder = run_dir / "client_state" / f"client-{client}"
    state = read_client_state(folder, before_round=before_round, run=run, strict=True)
    if state is None:
        known = sorted(p.name.removeprefix("client-") for p in (run_dir / "client_state").glob("client-*")) if (run_dir / "client_state").is_dir() else []
        raise ConfigError(f"client {client}: the run {run_dir} has no state for it" + (f"; clients with state: {', '.join(known[:20])}" if known else ""))
    return state.personal, int(state_files(folder, before_round, run)[-1].stem.split("-")[1])


def export_run(run_dir: str | Path, task: str | None, out: str | Path, client: int | None = None, experts_per_block: int | None = None) -> dict[str, Any]:
    """Write the personalized model of `task` (and `client`) from `run_dir` into `out`.

    An MoE run's task keeps the experts its router uses on the task's training images; with
    `experts_per_block`, only that many per MoE block, the most used (top-k routing is then
    over those; with 1 and no shared experts each MoE block is a dense MLP, so the export is
    the size and cost of the dense model); export.json then reports how often its predictions
    agree with the run's full model on the task's test images."""
    if experts_per_block is not None and experts_per_block < 1:
        raise ConfigError(f"--experts-per-block: must be >= 1, got {experts_per_block}")
    from .federated import client_tasks, federated_data, load_numpy_state, training_images

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the export")
    if (out / "checkpoint.safetensors").exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(f"--out {out} holds a run (checkpoint/metrics); export into a folder of its own so nothing of the run is overwritten")
    model, info = _run_model(run_dir)
    cfg = info["cfg"]
    if experts_per_block is not None and not hasattr(model, "moe_blocks"):
        raise ConfigError(f"--experts-per-block: the run {run_dir} has no MoE blocks (a dense model has no experts to keep)")
    if task is not None and task not in model.tasks:
        raise ConfigError(f"task {task!r}: the run has tasks {', '.join(model.tasks)}")
    if client is not None:
        if not 0 <= client < cfg.federation.total_clients():
            raise ConfigError(f"client {client}: the run has clients 0..{cfg.federation.total_clients() - 1}")
        own = [t for t in client_tasks(cfg, client) if t in model.tasks]
        task = task or (own or model.tasks)[0]
        if task not in own:  # its head there is the global model's, which these modes may never have trained
            raise ConfigError(f"client {client} does not train task {task!r} (its tasks: {', '.join(own) or 'none'}); "
                              "export that task's model from a client that trains it, or the global model (without --client)")
    task = task or model.tasks[0]
    head = copy.deepcopy(model.heads[task])
    mode = cfg.federation.personalization
    state_round: int | None = None
    if client is not None:
        if mode in ("finetune", "fedbabu"):
            raise ConfigError(f"client {client}: personalization {mode} fine-tunes the global model in the final evaluation and keeps "
                              "no personal model; export the global model (without --client)")
        if mode == "none":
            raise ConfigError(f"client {client}: personalization none: a client's model is the global one; export it without --client")
        # the client's state as of the checkpoint's round (a run stopped after it may have saved later ones)
        personal, state_round = _client_state(run_dir, client, (info["meta"].get("strategy") or {}).get("run_token"), before_round=_next_round(info["meta"]))
        # what the client's evaluation used: its personal parameters in the modes that load them
        # (an lda head is built on, and applied to, the global model's features), a Ditto client's own whole model
        params = {**(personal_params(personal) if mode in PERSONAL_PARAM_MODES else {}), **personal_model(personal)}
        if params:
            load_numpy_state(model, params, f"client {client} state")
            head = copy.deepcopy(model.heads[task])
        saved = personal_head(personal, task)
        if saved:
            if mode == "fedrod":  # generic logits plus personal ones: one linear head
                generic = head.state_dict()
                saved = {k: generic[k] + v.to(generic[k].dtype) for k, v in saved.items()}
            head.load_state_dict(saved)
        elif mode in ("fedrod", "local_head", "lda"):
            raise ConfigError(f"client {client} has no personal head for task {task!r} (its tasks: {personal_head_tasks(personal)})")
        elif mode == "ditto" and not personal_model(personal):
            raise ConfigError(f"client {client}: personalization ditto, but the client's state holds no model of its own (it has not trained yet); "
                              "export the global model (without --client)")
    if has_lora(model):
        merge_lora(model)
    model.eval()
    vit = copy.deepcopy(model.vit)
    kind = "dense"
    experts: dict[int, list[int]] = {}
    split, _ = federated_data(cfg)  # the run's data: the MoE's routing survey and the checks below
    test_set = split.test.for_task(task)
    test_images, labels = test_set.images, test_set.labels[task]
    if hasattr(model, "moe_blocks"):
        from moe import experts_used, prune_for_task

        kind = "moe"
        if cfg.moe.eval_capacity_factor is not None:
            warnings.warn(f"the run evaluates its MoE blocks with moe.eval_capacity_factor {cfg.moe.eval_capacity_factor}: tokens over an expert's "
                          "capacity are dropped, depending on the rest of the batch; the export routes every token to its top-k experts, "
                          "so its predictions can differ (export.json: agreement_with_run_model)", stacklevel=2)
        used = experts_used(model, training_images(cfg).for_task(task).images, task, most=experts_per_block)  # never the test images
        pruned = prune_for_task(model, task, used, reduce_top_k=experts_per_block is not None)
        experts = {b: list(pruned.moe_layers[b].expert_ids) for b in pruned.moe_blocks}
        vit = copy.deepcopy(pruned.vit)
        for b in pruned.moe_blocks:
            vit.blocks[b].mlp = DenseMoE(pruned.vit.blocks[b].mlp, task)
    consolidator = copy.deepcopy(model.consolidator)
    if consolidator is not None and kind == "dense":
        kind = "sherl"  # timm's forward has no place for the consolidator: its keys are the export's own
    task_model = TaskModel(vit, head, consolidator).eval()
    if not len(test_images):
        raise ConfigError(f"task {task!r}: the run's test set has no image of it, and the export checks its ONNX model on them")
    if kind == "dense":
        state = {k.removeprefix("vit."): v for k, v in task_model.state_dict().items() if k.startswith("vit.")}
        state.update({"head.weight": head.weight, "head.bias": head.bias})
    else:
        state = task_model.state_dict()
    example = test_images[:2] if len(test_images) > 1 else test_images[:1].repeat(2, 1, 1, 1)  # a batch of 1 would fix the ONNX batch size
    config = {
        "format": "fedtune-export",
        "kind": kind,
        "task": task,
        "client": client,
        "timm_name": cfg.model.name,
        "timm_kwargs": {k: v for k, v in {"img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size, "in_chans": cfg.model.in_chans, "depth": cfg.model.depth, "embed_dim": cfg.model.embed_dim, "num_heads": cfg.model.num_heads, "mlp_ratio": cfg.model.mlp_ratio, "num_classes": int(head.out_features)}.items() if v is not None},
        "classes": split.train.class_names.get(task) or [str(i) for i in range(int(head.out_features))],
        "normalize": {"mean": PIXEL_MEAN, "std": PIXEL_STD},
        "channels": cfg.model.in_chans,
        "experts": {str(b): e for b, e in experts.items()},
        # how the kept experts combine (an MoE export): top-k routing over them, the router's kind, the always-on shared experts
        "moe": None if kind != "moe" else {"blocks": sorted(experts), "top_k": min(int(pruned.moe_layers[b].top_k) for b in pruned.moe_blocks),
                                           "router": cfg.moe.router, "shared_experts": cfg.moe.shared_experts},
        "consolidate_at": model.consolidate_at,  # SHERL: the block that takes the consolidator's output (None: none)
        "source_run": str(run_dir),
        "round": info["meta"].get("round"),
        "client_state_round": state_round,  # the round the client's personal state was saved in
    }
    # every file is written and checked in a staging folder first and moved in at the end,
    # config.yaml (which predict reads first) last: a failed export leaves `out` as it was
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{STAGE_PREFIX}*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
    try:
        summary = _write_export(stage, out, task_model, model, state, config, example, test_images, labels, head, cfg)
        _publish(stage, out)
    except CheckpointError as exc:  # name the file as the user knows it, not the staging folder removed below
        raise CheckpointError(str(exc).replace(str(stage), str(out))) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


STAGE_PREFIX = ".export-"  # the staging folder inside --out


EXPORT_FILES = ("model.safetensors", "model.onnx", "export.json", "config.yaml")  # the order they are moved in


def _publish(stage: Path, out: Path) -> None:
    """Move the staged export's files into `out`: the old config.yaml goes first (so the
    folder is no export while the files change) and the new one comes last."""
    (out / "config.yaml").unlink(missing_ok=True)
    for name in EXPORT_FILES:  # each file on the disk before its rename: a power loss leaves no empty config.yaml
        replace_durably(stage / name, out / name)


def _write_export(stage: Path, out: Path, task_model: nn.Module, model: FedViT, state: dict[str, torch.Tensor], config: dict[str, Any],
                  example: torch.Tensor, test_images: torch.Tensor, labels: torch.Tensor, head: nn.Module, cfg: Any) -> dict[str, Any]:
    """Write the export's files into `stage` (check the ONNX model against `task_model`) and return export.json's summary."""
    task, kind, client = config["task"], config["kind"], config["client"]
    save_checkpoint(stage / "model.safetensors", state, {"format": "fedtune-export", "config": config})
    onnx_diff = write_onnx(task_model, example, test_images[:ONNX_CHECK_IMAGES], stage / "model.onnx")
    config["onnx_sha256"] = file_sha256(stage / "model.onnx")  # load_exported (predict) verifies it
    full_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    exported = sum(v.numel() * v.element_size() for v in state.values())
    summary = {"out": str(out), "kind": kind, "task": task, "client": client, "round": config["round"], "client_state_round": config["client_state_round"], "bytes": exported, "run_model_bytes": full_bytes,
               "inference_flops_per_image": inference_flops(task_model, example[:1]), "onnx_max_abs_diff": onnx_diff, "experts": config["experts"]}
    if kind == "moe":
        summary["run_eval_capacity_factor"] = cfg.moe.eval_capacity_factor  # None: the run routed every token too
    with torch.no_grad():
        mine = torch.cat([task_model(b).argmax(-1) for b in test_images.split(256)])
    # the exported model on every test image of the task (the run's central test set)
    summary.update(test_images=len(labels), test_accuracy=float((mine == labels).float().mean()))
    if kind != "dense":
        with torch.no_grad():
            theirs = torch.cat([head(model.forward_features(b, dense_plan(model), task)[0]).argmax(-1) for b in test_images.split(256)])
        summary["agreement_with_run_model"] = float((mine == theirs).float().mean())
        summary["run_model_test_accuracy"] = float((theirs == labels).float().mean())
    if kind == "moe":
        # the dense ViT of the same shape and its task head: what the MoE export is weighed against
        dense = TaskModel(copy.deepcopy(_dense_vit(cfg)), head).eval()
        summary["dense_bytes"] = sum(v.numel() * v.element_size() for k, v in dense.state_dict().items())
        summary["dense_inference_flops_per_image"] = inference_flops(dense, example[:1])
    (stage / "export.json").write_text(json.dumps(summary, indent=2))
    (stage / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return summary


ONNX_CHECK_IMAGES = 32  # test images the export compares the ONNX model on
ONNX_TOLERANCE = 1e-4  # largest logit difference the export accepts, relative to the largest logit magnitude (at least 1)


def write_onnx(module: nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path) -> float:
    """Export `module` (images -> logits, batch size free) with torch.onnx's exporter, then run
    it with onnxruntime on `check` images; return the largest difference from `module`'s
    logits, or raise CheckpointError when it exceeds ONNX_TOLERANCE times the largest logit
    magnitude (at least 1): float32 rounding grows with the logits, and a discriminant head's
    reach the hundreds."""
    import contextlib
    import io

    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False)
    with torch.no_grad():
        want = module(check).numpy()
    got = OnnxModel(path)(check)
    # a class a discriminant head never saw has a bias of ABSENT_CLASS_BIAS: its logits are
    # compared only in that they stay that low, the others on the present classes' scale
    absent = want < ABSENT_CLASS_BIAS / 2
    if (got[absent] >= ABSENT_CLASS_BIAS / 2).any() or not np.isfinite(got).all():
        raise CheckpointError(f"{path}: the ONNX model's logits are not the framework's (an absent class's logit is not far below the others, or one is not finite)")
    diff = float(np.abs(got - want)[~absent].max(initial=0.0))
    scale = max(1.0, float(np.abs(want[~absent]).max(initial=0.0)))
    if not diff <= ONNX_TOLERANCE * scale:
        raise CheckpointError(f"{path}: the ONNX model's logits differ from the framework's by {diff:.3g} (> {ONNX_TOLERANCE} x {scale:.3g}, the largest logit magnitude)")
    return diff


@torch.no_grad()
def inference_flops(module: nn.Module, image: torch.Tensor) -> int:
    """FLOPs of one forward pass of `module` on one image (torch's counter, CPU attention included)."""
    from .accounting import flop_counter_mode

    with flop_counter_mode() as counter:
        module(image)
    return int(counter.get_total_flops())


class OnnxModel:
    """An exported model run by onnxruntime alone: images [N, C, H, W] -> logits (numpy)."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types on unreadable files
            raise CheckpointError(f"corrupt or unreadable ONNX model {path}: {exc}") from exc
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return self.session.run(None, {self.input: arr.astype(np.float32, copy=False)})[0]


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_export_config(folder: Path) -> dict[str, Any]:
    """An export's config.yaml, checked: what predict needs is there and well formed."""
    path = folder / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); export the model again") from exc
    problems = []
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a mapping; export the model again")
    classes, kwargs, norm = config.get("classes"), config.get("timm_kwargs"), config.get("normalize")
    if not isinstance(classes, list) or not classes:
        problems.append("classes must be a non-empty list")
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("img_size"), int) or not 4 <= kwargs["img_size"] <= 4096:
        problems.append("timm_kwargs.img_size must be an integer in 4..4096")
    if config.get("channels") not in (1, 3):
        problems.append("channels must be 1 or 3")
    if not isinstance(norm, dict) or not all(isinstance(norm.get(k), (int, float)) for k in ("mean", "std")) or not norm.get("std"):
        problems.append("normalize must have numbers mean and std (std non-zero)")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)} (was it edited by hand? export the model again)")
    return config


def load_exported(folder: str | Path) -> tuple[OnnxModel, dict[str, Any]]:
    """The ONNX model and the config of an export folder; the model file's checksum is verified."""
    folder = Path(folder)
    cfg_path, onnx_path = folder / "config.yaml", folder / "model.onnx"
    if not cfg_path.is_file() or not onnx_path.is_file():
        raise CheckpointError(f"{folder}: not an exported model (needs config.yaml and model.onnx from `fedtune export`)")
    config = read_export_config(folder)
    if "onnx_sha256" not in config:
        raise CheckpointError(f"{cfg_path}: has no onnx_sha256 (an export that did not finish, or one made before the export checked its model); export the model again")
    if file_sha256(onnx_path) != config["onnx_sha256"]:
        raise CheckpointError(f"{onnx_path}: checksum mismatch with config.yaml (the file is damaged); export the model again")
    return OnnxModel(onnx_path), config


def load_timm(folder: str | Path) -> nn.Module:
    """A dense export as a plain timm model (no fedtune classes involved)."""
    import timm

    config = read_export_config(Path(folder))
    if config.get("kind") != "dense":
        raise ConfigError(f"{folder}: an {config.get('kind')} export is not a plain timm model; use model.onnx")
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"])
    state, _ = read_state(Path(folder) / "model.safetensors")  # verifies the checksum
    model.load_state_dict(state)
    return model.eval()


def preprocess(paths: list[str | Path], config: dict[str, Any]) -> np.ndarray:
    """Image files -> a normalised float32 batch [N, C, H, W] at the model's size and channels (PIL and numpy only)."""
    from PIL import Image

    size = int(config["timm_kwargs"]["img_size"])
    batch = []
    for p in paths:
        try:
            im = Image.open(p)
            im = im.convert("L" if config["channels"] == 1 else "RGB").resize((size, size), Image.BILINEAR)
        except Image.DecompressionBombError as exc:
            raise ConfigError(f"image {p} is too large to read safely ({exc})") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read image {p}: {exc}") from exc
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        batch.append((arr - config["normalize"]["mean"]) / config["normalize"]["std"])
    return np.stack(batch).astype(np.float32)


PREDICT_BATCH = 64  # images read and run at a time: memory stays flat however many files are given


def predict(folder: str | Path, paths: list[str | Path]) -> list[dict[str, Any]]:
    """Class, id and probability of each image file, from the folder's ONNX model (onnxruntime)."""
    module, config = load_exported(folder)
    if not paths:
        raise ConfigError("predict: no image files given")
    out = []
    for start in range(0, len(paths), PREDICT_BATCH):
        chunk = paths[start : start + PREDICT_BATCH]
        logits = module(preprocess(chunk, config))
        if logits.shape[-1] != len(config["classes"]):
            raise CheckpointError(f"{folder}: the model gives {logits.shape[-1]} logits, config.yaml names {len(config['classes'])} classes; export the model again")
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for p, row in zip(chunk, probs, strict=True):
            k = int(row.argmax())
            out.append({"image": str(p), "class_id": k, "class": config["classes"][k], "probability": float(row[k])})
    return out
