"""Pretraining a small ViT backbone for the embedded default, reproducibly.

The embedded default fine-tunes on scikit-learn's digits (handwritten), so the backbone is
pretrained on data disjoint from them: printed characters ("glyphs": digits and upper-case
letters, 36 classes) rendered in the fonts matplotlib ships, at random sizes, offsets,
rotations, shears, stroke widths and elastic distortions. Most are "scanned" the way the
UCI optdigits set (scikit-learn's digits) was made: a size-normalised 32x32 bitmap whose
4x4 blocks are counted into an 8x8 image of 17 levels; the rest are blurred or low-res
renders. Seeded end to end: the same command on the same machine writes the same weights.
`fedtune pretrain` caches the checkpoint; `fedtune/assets/` ships the one the README's
commands produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataConfig, ImageSet, load_data
from .errors import ConfigError
from .model import (
    FedViT,
    ModelConfig,
    build_model,
    load_backbone,
    model_meta,
    read_state,
    save_checkpoint,
)
from .typedconfig import check_choices, differences, from_dict, to_dict
from .weights import cache_dir

GLYPHS = string.digits + string.ascii_uppercase


def glyph_fonts() -> list[Path]:
    """TrueType fonts shipped with matplotlib (DejaVu, STIX, Computer Modern): no download."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    keep = ("DejaVuSans", "DejaVuSerif", "STIXGeneral", "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10")
    return sorted(p for p in folder.glob("*.ttf") if p.name.startswith(keep) and "Display" not in p.name)


def make_glyphs(num: int, size: int, seed: int, channels: int = 3, scan_fraction: float = 0.0) -> ImageSet:
    """Printed characters (digits and upper-case letters, 36 classes) in ~25 fonts: random size,
    offset, rotation, shear and stroke. A `scan_fraction` of them go through `_scan` (elastic
    distortion, then an 8x8 block-count image like scikit-learn's digits, upsampled as the
    digits loader does); of the rest, most are area-downsampled to 8-12 px and upsampled
    again, the others blurred."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    from .data.core import _to_model_images, normalize_pixels

    rng = np.random.default_rng(seed)
    paths = glyph_fonts()
    fonts: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    labels = rng.integers(0, len(GLYPHS), size=num)
    scanned = rng.random(num) < scan_fraction
    images = np.zeros((num, size, size), dtype=np.float32)
    low_res = np.zeros((num, 8, 8), dtype=np.float32)
    for i, lab in enumerate(labels):
        # scanned glyphs are drawn at 64 px and normalised later; the others at their final size
        ref = 64 if scanned[i] else size
        big = ref * 2
        key = (int(rng.integers(len(paths))) if paths else -1, int(rng.integers(int(ref * 0.5), int(ref * 0.85) + 1)))
        if key not in fonts:
            fonts[key] = ImageFont.truetype(str(paths[key[0]]), key[1]) if key[0] >= 0 else ImageFont.load_default(size=key[1])
        im = Image.new("L", (big, big), 0)
        stroke = int(rng.choice([0, 0, 0, 1, 2])) if scanned[i] else int(rng.integers(0, 3))
        ImageDraw.Draw(im).text((ref, ref), GLYPHS[lab], fill=255, font=fonts[key], anchor="mm", stroke_width=stroke, stroke_fill=255)
        shear = float(rng.uniform(-0.3, 0.3))
        im = im.transform((big, big), Image.AFFINE, (1, shear, -shear * ref, 0, 1, 0), resample=Image.BILINEAR)
        im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, center=(ref, ref))
        if scanned[i]:
            low_res[i] = _scan(np.asarray(im, dtype=np.float32) / 255.0, rng)
            continue
        dx, dy = rng.integers(-size // 10, size // 10 + 1, size=2)
        im = im.crop((size // 2 - dx, size // 2 - dy, size // 2 - dx + size, size // 2 - dy + size))
        if rng.random() < 0.6:
            low = int(rng.integers(8, 13))
            im = im.resize((low, low), Image.BOX).resize((size, size), Image.BILINEAR)
        else:
            im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
        arr = np.asarray(im, dtype=np.float32) / 255.0
        images[i] = arr * rng.uniform(0.7, 1.0) + rng.normal(0.0, 0.02, arr.shape)
    x = torch.from_numpy(np.clip(images, 0.0, 1.0)).unsqueeze(1).repeat(1, channels, 1, 1)
    x = normalize_pixels(x)
    if scanned.any():
        x[torch.from_numpy(scanned)] = _to_model_images(low_res[scanned][:, None], channels, size, scale=1.0)
    return ImageSet(images=x, labels={"glyph": torch.from_numpy(labels.astype(np.int64))}, num_classes={"glyph": len(GLYPHS)})


def _scan(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rendered glyph (ink in 0..1) as the UCI optdigits preprocessing saw a handwritten one:
    elastic distortion, binarised, its bounding box scaled to fit 32x32 (aspect kept) and
    centred, then the "on" pixels of each 4x4 block counted: 8x8, values 0..16, /16."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = ink.shape
    if rng.random() < 0.8:  # smooth random displacement field, std of 1-3.5 px on a ~50 px glyph
        sigma, shift = rng.uniform(6.0, 9.0), rng.uniform(1.0, 3.5)
        field = [gaussian_filter(rng.uniform(-1, 1, ink.shape), sigma) for _ in range(2)]
        field = [f * (shift / max(float(f.std()), 1e-8)) for f in field]
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        ink = map_coordinates(ink, [yy + field[0], xx + field[1]], order=1, mode="constant")
    on = ink > 0.5
    rows, cols = np.nonzero(on.any(1))[0], np.nonzero(on.any(0))[0]
    if len(rows) == 0:
        return np.zeros((8, 8), dtype=np.float32)
    crop = on[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fit = int(rng.integers(28, 33))
    scale = fit / max(crop.shape)
    ch, cw = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((cw, ch), Image.BILINEAR)) > 127
    frame = np.zeros((32, 32), dtype=bool)
    top = (32 - ch) // 2 + int(rng.integers(-1, 2))
    left = (32 - cw) // 2 + int(rng.integers(-1, 2))
    top, left = min(max(top, 0), 32 - ch), min(max(left, 0), 32 - cw)
    frame[top : top + ch, left : left + cw] = small
    return frame.reshape(8, 4, 8, 4).sum((1, 3)).astype(np.float32) / 16.0


TEXTURES = ("solid", "h_stripes", "v_stripes", "diagonal", "checker", "dots", "gradient", "outline")


def make_contours(num: int, size: int, seed: int, classes: int = 64, channels: int = 3) -> ImageSet:
    """Formula-driven silhouettes (after the radial contours of Kataoka et al., CVPR 2022):
    a closed contour r(t) = 1 + sum_j a_j cos(j t + p_j), j = 1..6, whose amplitudes and
    phases define `classes` classes (task "contour"), filled with one of 8 textures (task
    "texture": solid, stripes three ways, checker, dots, gradient, outline). Each image
    perturbs its class's amplitudes (x0.85-1.15) and phases, and draws the shape at a random
    scale, aspect, rotation, offset, period, contrast and brightness; drawn at 4x, area-
    downsampled. No natural image is involved; the same seed gives the same images."""
    from PIL import Image, ImageDraw

    from .data.core import normalize_pixels

    rng = np.random.default_rng(seed)
    harm = np.arange(1, 7)
    # the classes come from their own stream: the same `classes` give the same shapes whatever `num` is
    crng = np.random.default_rng(10_007 * classes + 17)
    amp = crng.uniform(0.0, 0.5, (classes, 6)) / harm**0.6
    phase = crng.uniform(0.0, 2 * np.pi, (classes, 6))
    stretch = crng.uniform(0.6, 1.0, classes)  # the class's own aspect (height against width)
    label = rng.integers(0, classes, num)
    texture = rng.integers(0, len(TEXTURES), num)
    big = size * 4
    t = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    images = np.empty((num, size, size), dtype=np.float32)
    for i in range(num):
        c = label[i]
        a = amp[c] * rng.uniform(0.85, 1.15, 6)
        p = phase[c] + rng.normal(0.0, 0.15, 6)
        r = 1.0 + (a[:, None] * np.cos(harm[:, None] * t + p[:, None])).sum(0)
        r = r / r.max()
        scale = rng.uniform(0.38, 0.5) * big
        sx, sy = scale * rng.uniform(0.9, 1.1), scale * stretch[c] * rng.uniform(0.9, 1.1)
        rot = rng.uniform(-0.35, 0.35)
        px, py = r * np.cos(t) * sx, r * np.sin(t) * sy
        cx, cy = big / 2 + rng.uniform(-0.08, 0.08) * big, big / 2 + rng.uniform(-0.08, 0.08) * big
        pts = np.stack([cx + px * np.cos(rot) - py * np.sin(rot), cy + px * np.sin(rot) + py * np.cos(rot)], 1)
        mask_im = Image.new("L", (big, big), 0)
        kind = TEXTURES[texture[i]]
        if kind == "outline":
            ImageDraw.Draw(mask_im).line([tuple(q) for q in pts] + [tuple(pts[0])], fill=255, width=int(rng.integers(3, 7)))
        else:
            ImageDraw.Draw(mask_im).polygon([tuple(q) for q in pts], fill=255)
        mask = np.asarray(mask_im, dtype=np.float32) / 255.0
        period = rng.uniform(5.0, 12.0)
        if kind == "h_stripes":
            pattern = (yy // (period / 2)) % 2
        elif kind == "v_stripes":
            pattern = (xx // (period / 2)) % 2
        elif kind == "diagonal":
            pattern = ((xx + yy) // (period / 1.4)) % 2
        elif kind == "checker":
            pattern = ((xx // period) + (yy // period)) % 2
        elif kind == "dots":
            pattern = (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 4) ** 2).astype(np.float32)
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            g = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            pattern = (g - g.min()) / max(float(np.ptp(g)), 1.0)
        else:  # solid, outline
            pattern = np.ones_like(xx)
        contrast = rng.uniform(0.35, 0.7) if kind not in ("solid", "outline") else 0.0
        ink = rng.uniform(0.6, 1.0) * (1.0 - contrast * pattern)
        canvas = rng.uniform(0.0, 0.1) + mask * ink
        small = canvas.reshape(size, 4, size, 4).mean((1, 3))
        images[i] = small + rng.normal(0.0, 0.02, small.shape)
    x = torch.from_numpy(np.clip(images, 0.0, 1.0)).unsqueeze(1).repeat(1, channels, 1, 1)
    labels = {"contour": torch.from_numpy(label.astype(np.int64)), "texture": torch.from_numpy(texture.astype(np.int64))}
    return ImageSet(images=normalize_pixels(x), labels=labels, num_classes={"contour": classes, "texture": len(TEXTURES)})


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone to pretrain
    glyphs: int = 24000  # rendered character images (digits and upper-case letters)
    scan_fraction: float = 0.0  # share of glyphs "scanned" to 8x8 like scikit-learn's digits
    init_from: str | None = None  # continue from this fedtune checkpoint (None: random init)
    shapes: int = 0  # generated shapes images (tasks shape, colour, count)
    contours: int = 0  # formula-driven silhouettes (tasks contour, texture): `make_contours`
    contour_classes: int = 64  # contour classes
    epochs: int = 4  # passes over both sets
    batch_size: int = 64  # batch size
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay, warm-up)
    weight_decay: float = 0.05  # AdamW weight decay
    seed: int = 0  # seed for data generation, initialisation and shuffling
    init: Literal["mimetic", "timm"] = "timm"  # mimetic (attention initialised like a trained one) | timm

    def validate(self, prefix: str = "") -> None:
        if self.model.pretrained:
            raise ConfigError(f"{prefix}model.pretrained: pretraining starts from random weights; leave it empty")
        if min(self.glyphs, self.shapes, self.contours) < 0 or self.glyphs + self.shapes + self.contours == 0:
            raise ConfigError(f"{prefix}glyphs/shapes/contours: need some pretraining images, none negative")
        if self.contour_classes < 2:
            raise ConfigError(f"{prefix}contour_classes: must be >= 2, got {self.contour_classes}")
        check_choices(self, prefix)
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{prefix}epochs/batch_size: must be >= 1")
        if not 0.0 <= self.scan_fraction <= 1.0:
            raise ConfigError(f"{prefix}scan_fraction: must be in [0, 1], got {self.scan_fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"{prefix}lr/weight_decay: need lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.init_from and not Path(self.init_from).is_file():
            raise ConfigError(f"{prefix}init_from: no such checkpoint: {self.init_from}")

    def identity(self) -> dict:
        """What decides the pretrained file: the config (without the silhouettes' keys when it
        has none, as configs from before they existed) and `init_from`'s contents, not only its path."""
        d = comparable_pretrain(to_dict(self))
        if self.init_from:
            d["init_from_sha256"] = hashlib.sha256(Path(self.init_from).read_bytes()).hexdigest()
        return d

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]


def made_by_another(meta: dict, cfg: PretrainConfig) -> list[str]:
    """The keys in which the pretraining that wrote a file (its metadata `meta`) differs from
    `cfg` ([] when it is the same): the config compared across versions, and, where the file
    records it, `init_from`'s contents."""
    changed = differences(comparable_pretrain(meta.get("pretrain") or {}), comparable_pretrain(to_dict(cfg)))
    if not changed and meta.get("pretrain_key") not in (None, cfg.key()):
        changed = ["init_from (its contents)"]
    return changed


def comparable_pretrain(d: dict) -> dict:
    """A pretraining config as written in a file's metadata, comparable across versions: a
    config with no silhouettes compares without their keys (older files lack them)."""
    d = dict(d)
    if not d.get("contours"):
        d.pop("contours", None), d.pop("contour_classes", None)
    return d


def pretrain_sets(cfg: PretrainConfig) -> list[ImageSet]:
    m = cfg.model
    sets = []
    if cfg.glyphs:
        sets.append(make_glyphs(cfg.glyphs, m.img_size, cfg.seed, m.in_chans, cfg.scan_fraction))
    if cfg.shapes:
        # a seed offset keeps these images apart from the shapes set used for fine-tuning
        split = load_data(from_dict(DataConfig, {"name": "shapes", "img_size": m.img_size, "channels": m.in_chans, "num_samples": cfg.shapes, "test_fraction": 0.05, "seed": cfg.seed, "shapes_seed_offset": 100_003}))
        sets.append(split.train)
    if cfg.contours:
        sets.append(make_contours(cfg.contours, m.img_size, cfg.seed + 7, cfg.contour_classes, m.in_chans))
    return sets


def pretrain(cfg: PretrainConfig, out: Path | None = None, progress: bool = True) -> Path:
    """Pretrain the backbone on every task of the pretraining sets; write a safetensors checkpoint."""
    cfg.validate("pretrain.")
    out = Path(out) if out else cache_dir() / "pretrained" / f"{cfg.key()}.safetensors"
    partial = out.with_name(out.stem + ".partial.safetensors")
    if partial.exists():  # an interrupted run's checkpoint: this run would overwrite it at its step 500
        kept = partial.with_name(f"{out.stem}.partial-{time.strftime('%Y%m%d-%H%M%S')}.safetensors")
        partial.replace(kept)
        warnings.warn(f"{partial} (an interrupted run's checkpoint) kept as {kept}; this run starts from step 0", stacklevel=2)
    torch.manual_seed(cfg.seed)
    sets = pretrain_sets(cfg)
    num_classes = {t: n for s in sets for t, n in s.num_classes.items()}
    model = build_model(cfg.model, num_classes)
    if cfg.init_from:
        # continue an earlier pretraining: the backbone and the heads it has for these tasks
        load_backbone(model, cfg.init_from, strict=True)
        state, _ = read_state(cfg.init_from)
        heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
        own = model.heads.state_dict()
        model.heads.load_state_dict({k: v for k, v in heads.items() if k in own and v.shape == own[k].shape}, strict=False)
    elif cfg.init == "mimetic":
        mimetic_init(model)
    # one batch stream: each batch comes from one set; every task of that set adds to the loss
    plan = []
    for si, s in enumerate(sets):
        g = torch.Generator().manual_seed(cfg.seed * 7919 + si)
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(s), generator=g)
            plan += [(si, perm[i : i + cfg.batch_size]) for i in range(0, len(s), cfg.batch_size)]
    order = torch.randperm(len(plan), generator=torch.Generator().manual_seed(cfg.seed))
    plan = [plan[i] for i in order]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, len(plan) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / len(plan)))))
    bar = _bar(len(plan), progress)
    probe = make_glyphs(500, cfg.model.img_size, cfg.seed + 12345, cfg.model.in_chans, cfg.scan_fraction) if cfg.glyphs else None
    start = time.time()
    model.train()
    for step, (si, idx) in enumerate(plan):
        s = sets[si]
        x = s.images[idx]
        feats = model.vit.forward_head(model.vit.forward_features(x), pre_logits=True)
        loss = sum(F.cross_entropy(model.heads[t](feats), s.labels[t][idx]) for t in s.tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
            if probe is not None and (step + 1) % 250 == 0:
                model.eval()
                with torch.no_grad():
                    acc = float((model(probe.images, "glyph").argmax(-1) == probe.labels["glyph"]).float().mean())
                model.train()
                bar.write(f"step {step + 1}: held-out glyph accuracy {acc:.3f}")
        if (step + 1) % 500 == 0 and step + 1 < len(plan):  # a long run leaves a usable checkpoint
            save_checkpoint(partial, model.state_dict(), model_meta(cfg.model, num_classes, pretrain=to_dict(cfg), step=step + 1))
    if bar is not None:
        bar.close()
    meta = model_meta(cfg.model, num_classes, pretrain=to_dict(cfg), pretrain_key=cfg.key(), seconds=round(time.time() - start, 1))
    save_checkpoint(out, model.state_dict(), meta)
    partial.unlink(missing_ok=True)
    return out


@torch.no_grad()
def mimetic_init(model: FedViT, a_qk: float = 0.7, b_qk: float = 0.7, a_vo: float = 0.4, b_vo: float = 0.4) -> None:
    """Mimetic initialisation (Trockman & Kolter, 2023): per head, W_q W_k^T ~ a Z + b I and
    W_v W_o ~ a Z - b I, as in trained attention layers; ViTs trained from scratch on little
    data learn much faster from it."""
    for blk in model.vit.blocks:
        attn = blk.attn
        d, h, hd = attn.qkv.in_features, attn.num_heads, attn.head_dim
        w = attn.qkv.weight.view(3, h, hd, d)
        proj = attn.proj.weight.view(d, h, hd)
        for i in range(h):
            z = torch.randn(d, d) / math.sqrt(d)
            u, s, vh = torch.linalg.svd(a_qk * z + b_qk * torch.eye(d))
            root = s[:hd].sqrt()
            w[0, i] = (u[:, :hd] * root).T
            w[1, i] = (vh[:hd].T * root).T
            z = torch.randn(d, d) / math.sqrt(d)
            u, s, vh = torch.linalg.svd(a_vo * z - b_vo * torch.eye(d))
            root = s[:hd].sqrt()
            w[2, i] = (vh[:hd].T * root).T  # v = W_v x
            proj[:, i] = u[:, :hd] * root  # out = W_o v


def pretrain_accuracy(model: FedViT, cfg: PretrainConfig) -> dict[str, float]:
    """Accuracy of a pretrained model on freshly generated (held-out) pretraining-style data."""
    held = replace(cfg, seed=cfg.seed + 1, glyphs=1000, shapes=1000 if cfg.shapes else 0, contours=1000 if cfg.contours else 0)
    out = {}
    model.eval()
    with torch.no_grad():
        for s in pretrain_sets(held):
            feats = model.vit.forward_head(model.vit.forward_features(s.images), pre_logits=True)
            for t in s.tasks:
                if t in model.heads:
                    out[t] = float((model.heads[t](feats).argmax(-1) == s.labels[t]).float().mean())
    return out


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pretrain", unit="step")
