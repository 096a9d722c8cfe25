"""Train the toy-urban model: a small autoencoder, then the text encoder and U-Net on cached latents.

Reproducible (every batch, timestep and noise comes from a generator seeded by the step number) and
resumable (checkpoints written atomically; a rerun of the same command continues where it stopped).
Checkpoints use ``torch.save`` of plain tensors and are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opendaam._io import atomic_write_with
from opendaam.toyworld.model import ToyConfig, build_toy_pipeline, toy_components
from opendaam.toyworld.scene import CLASSES, WorldConfig, render_scene, template_caption

__all__ = ["HELD_OUT", "TrainConfig", "caption_gap", "export_pipeline", "render_dataset", "train"]

HELD_OUT = 10**6
"""Held-out scenes use seeds from here on; training scenes use 0 .. scenes - 1."""


@dataclass(frozen=True)
class TrainConfig:
    """How toy-urban is trained (the defaults made the bundled weights).

    Examples:
        >>> TrainConfig().unet_steps, TrainConfig().batch
        (2400, 32)
    """

    scenes: int = 8000  # training scenes; more than the steps x batch / epochs the budget allows to overfit
    vae_steps: int = 700  # the autoencoder only has to reproduce flat-coloured shapes
    vae_batch: int = 16  # small batches: 0.4 s a step on one thread
    vae_lr: float = 2e-3  # Adam step of the autoencoder
    vae_kl: float = 1e-6  # a weak KL term keeps the latent well scaled without blurring it
    unet_steps: int = 2400  # U-Net steps (batch 32); prototype 2 reached a working model at 1,680
    decay_start: int | None = None  # from this step the learning rates fall linearly to 0 at unet_steps
    unet_lr: float = 1e-3  # prototype 2's U-Net learning rate
    text_lr: float = 3e-3  # prototype 2's text-encoder learning rate: the words must move fast
    batch: int = 32  # prototype 2's batch
    min_snr: float = 5.0  # min-SNR-5 loss weighting (Hang et al.): faster, steadier convergence
    seed: int = 0  # seeds the weights, batches, timesteps and noise
    eval_every: int = 400  # U-Net steps between caption-gap measurements
    eval_scenes: int = 64  # held-out scenes for the caption gap (the issue asks for at least 64)
    checkpoint_seconds: float = 120.0  # at most this much work is lost when the run is killed


def _atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it into place."""
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def _load(path: Path):
    """A checkpoint written by :func:`_atomic_save` (tensors and plain values only)."""
    return torch.load(path, weights_only=True)


def render_dataset(seeds, forced: list[str] | None = None,
                   world: WorldConfig | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """Images in [-1, 1] ``(N, 3, 64, 64)``, captions and classes of the scenes of ``seeds``.

    Examples:
        >>> images, captions, classes = render_dataset([0, 1])
        >>> images.shape, len(captions)
        (torch.Size([2, 3, 64, 64]), 2)
    """
    images, captions, classes = [], [], []
    for i, seed in enumerate(seeds):
        scene = render_scene(int(seed), world, cls=forced[i] if forced else None)
        images.append(np.asarray(scene.image))
        captions.append(scene.caption)
        classes.append(scene.cls)
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0  # (N, 64, 64, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), captions, classes


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Padded token ids ``(N, 77)``."""
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _alphas(scheduler) -> torch.Tensor:
    """Cumulative alphas of the training noise schedule, ``(1000,)``."""
    return scheduler.alphas_cumprod.float()


def _train_vae(vae, images: torch.Tensor, cfg: TrainConfig, log) -> None:
    """Reconstruction training of the autoencoder (MSE plus a weak KL term)."""
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    for step in range(cfg.vae_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx]  # (B, 3, 64, 64)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log({"phase": "vae", "step": step, "loss": float(loss)})
    vae.eval()


def _noised(latents: torch.Tensor, scheduler, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noise drawn from ``seed``, the latents noised to timestep ``t`` with it, and the timesteps ``(N,)``."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    a = _alphas(scheduler)[t]
    return noise, a.sqrt() * latents + (1 - a).sqrt() * noise, torch.full((len(latents),), t)


@torch.no_grad()
def _predict(unet, text_encoder, tokenizer, noisy: torch.Tensor, steps: torch.Tensor,
             captions: list[str]) -> torch.Tensor:
    """The U-Net's noise predictions ``(N, 4, h, w)`` for ``captions`` (one per latent)."""
    states = text_encoder(_tokenize(tokenizer, captions))[0]  # (N, 77, D)
    return unet(noisy, steps, encoder_hidden_states=states).sample


@torch.no_grad()
def _caption_predictions(unet, text_encoder, tokenizer, vae_latents: torch.Tensor, classes: list[str], scheduler,
                         t: int = 500, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The noise and the U-Net's predictions ``(N, 4, h, w)`` at ``t`` with the right, the wrong-class (the
    next class of :data:`CLASSES`) and the empty caption, from the same noisy latents."""
    others = sorted(set(classes) - set(CLASSES))
    if others:
        raise ValueError(f"caption_gap measures the thesis classes {list(CLASSES)} (the wrong caption is the next "
                         f"one of them); got {others}")
    noise, noisy, steps = _noised(vae_latents, scheduler, t, seed)
    wrong = [CLASSES[(CLASSES.index(c) + 1) % len(CLASSES)] for c in classes]
    preds = {}
    for name, captions in (("right", [template_caption(c) for c in classes]),
                           ("wrong", [template_caption(c) for c in wrong]), ("empty", [""] * len(classes))):
        preds[name] = _predict(unet, text_encoder, tokenizer, noisy, steps, captions)
    return noise, preds


@torch.no_grad()
def caption_gap(unet, text_encoder, tokenizer, vae_latents: torch.Tensor, classes: list[str], scheduler,
                t: int = 500, seed: int = 1) -> dict:
    """Denoising loss at timestep ``t`` with the right, a wrong-class and an empty caption.

    The wrong caption is the template with the next class of :data:`CLASSES`; the noise is fixed by
    ``seed``, so the three losses differ only by the caption.

    Returns:
        ``{"right", "wrong", "empty"}`` mean losses and the relative gaps ``wrong_gap``, ``empty_gap``.

    Examples:
        >>> parts = toy_components()
        >>> z = torch.zeros(2, 4, 16, 16)
        >>> gap = caption_gap(parts["unet"], parts["text_encoder"], parts["tokenizer"], z, ["car", "rider"],
        ...                   parts["scheduler"])
        >>> sorted(gap)
        ['empty', 'empty_gap', 'right', 'wrong', 'wrong_gap']
    """
    noise, preds = _caption_predictions(unet, text_encoder, tokenizer, vae_latents, classes, scheduler, t, seed)
    losses = {name: float(F.mse_loss(pred, noise)) for name, pred in preds.items()}
    losses["wrong_gap"] = losses["wrong"] / losses["right"] - 1
    losses["empty_gap"] = losses["empty"] / losses["right"] - 1
    return losses


def train(out: str | Path, config: TrainConfig | None = None, model: ToyConfig | None = None,
          threads: int = 1, minutes: float | None = None, world: WorldConfig | None = None) -> Path | None:
    """Train (or resume training) toy-urban into ``out``; returns the folder of the saved pipeline.

    Phases: render the training scenes, train the autoencoder and encode every scene once
    (``out/vae.pt``), train U-Net and text encoder on the cached latents (``out/unet.pt``, written
    atomically every ``checkpoint_seconds``), log loss and caption gap to ``out/log.jsonl``, save the
    pipeline with ``save_pretrained`` (safetensors) to ``out/pipeline``. Rerunning resumes; the result
    depends only on the configs, not on interruptions.

    Args:
        out: the run folder.
        config: the training recipe.
        model: the architecture sizes.
        threads: torch intra-op threads, set explicitly (1 beside another job on 2 cores).
        minutes: pause (after writing a checkpoint) once this many minutes have passed; ``None`` runs
            to the end.
        world: the scenes' world; :class:`~opendaam.toyworld.scene.WorldConfig` defaults if omitted.

    Returns:
        The pipeline folder, or ``None`` if the run paused before its last step.

    Examples:
        >>> train("/tmp/toy-urban-run", TrainConfig(unet_steps=10), minutes=5)  # doctest: +SKIP
    """
    cfg = config or TrainConfig()
    model = model or ToyConfig()
    world = world or WorldConfig()
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    started = time.perf_counter()

    def log(entry: dict) -> None:
        entry = {**entry, "wall_s": round(time.perf_counter() - started, 1)}
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    parts = toy_components(model, seed=cfg.seed)
    vae, unet, text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
    tokenizer, scheduler = parts["tokenizer"], parts["scheduler"]

    # 1. the autoencoder, and the training set encoded once
    vae_ckpt = out / "vae.pt"
    world_json = json.dumps(asdict(world), sort_keys=True)
    if vae_ckpt.exists():
        state = _load(vae_ckpt)
        if "world" in state and state["world"] != world_json:
            raise ValueError(f"{out} holds a run on another world ({state['world']}); resume it with the same "
                             f"world settings or train into a new --out (asked for {world_json})")
        vae.load_state_dict(state["vae"])
        latents, ids = state["latents"], state["ids"]
        scaling = float(state["scaling"])
    else:
        images, captions, _ = render_dataset(range(cfg.scenes), world=world)
        log({"phase": "data", "scenes": cfg.scenes})
        _train_vae(vae, images, cfg, log)
        with torch.no_grad():
            means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        scaling = float(1.0 / means.std())
        latents = means * scaling  # (N, 4, 16, 16)
        ids = _tokenize(tokenizer, captions)  # (N, 77)
        _atomic_save({"vae": vae.state_dict(), "latents": latents, "ids": ids, "scaling": scaling,
                      "world": world_json}, vae_ckpt)
        log({"phase": "vae_done", "scaling_factor": scaling})
    vae.register_to_config(scaling_factor=scaling)

    # 2. held-out scenes for the caption gap
    held_classes = [CLASSES[i % len(CLASSES)] for i in range(cfg.eval_scenes)]
    held_images, _, _ = render_dataset([HELD_OUT + i for i in range(cfg.eval_scenes)], held_classes, world)
    with torch.no_grad():
        held = vae.encode(held_images).latent_dist.mean * scaling

    # 3. U-Net and text encoder on the cached latents
    params = [{"params": unet.parameters(), "lr": cfg.unet_lr},
              {"params": text_encoder.parameters(), "lr": cfg.text_lr}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    step = 0
    ckpt = out / "unet.pt"
    if ckpt.exists():
        state = _load(ckpt)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log({"phase": "resume", "step": step})
    alphas = _alphas(scheduler)
    snr = alphas / (1 - alphas)  # (1000,)
    weights = torch.clamp(snr, max=cfg.min_snr) / snr  # min-SNR weighting for epsilon prediction
    unet.train()
    text_encoder.train()
    last_save = time.perf_counter()
    while step < cfg.unet_steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]  # (B, 4, 16, 16)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if cfg.decay_start is not None and step >= cfg.decay_start:
            frac = 1.0 - (step - cfg.decay_start) / max(1, cfg.unet_steps - cfg.decay_start)
            for group, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr), strict=True):
                group["lr"] = base * frac
        states = text_encoder(ids[idx])[0]  # (B, 77, 64)
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        per_item = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))  # (B,)
        loss = (weights[t] * per_item).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log({"phase": "unet", "step": step, "loss": float(loss)})
        if step % cfg.eval_every == 0 or step == cfg.unet_steps:
            unet.eval()
            text_encoder.eval()
            log({"phase": "caption_gap", "step": step,
                 **caption_gap(unet, text_encoder, tokenizer, held, held_classes, scheduler)})
            unet.train()
            text_encoder.train()
        if time.perf_counter() - last_save > cfg.checkpoint_seconds or step == cfg.unet_steps:
            _atomic_save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "opt": opt.state_dict(),
                          "step": step}, ckpt)
            last_save = time.perf_counter()
            if minutes is not None and last_save - started > 60 * minutes and step < cfg.unet_steps:
                log({"phase": "paused", "step": step})
                return None

    # 4. the pipeline, saved once
    unet.eval()
    text_encoder.eval()
    pipe = build_toy_pipeline(parts)
    final = out / "pipeline"
    pipe.save_pretrained(final)
    defaults = {"num_inference_steps": 20, "guidance_scale": 5.0, "height": model.image_size,
                "width": model.image_size}
    (final / "opendaam.json").write_text(json.dumps(defaults, indent=1))
    recipe = json.dumps({"train": asdict(cfg), "model": asdict(model), "world": asdict(world), "threads": threads},
                        indent=1)
    (out / "train_config.json").write_text(recipe)
    (final / "train_config.json").write_text(recipe)  # export_pipeline ships it beside the weights
    log({"phase": "done", "steps": step, "minutes": round((time.perf_counter() - started) / 60, 1),
         "unet_params": sum(p.numel() for p in unet.parameters()), "scaling_factor": scaling})
    return final


def export_pipeline(source: str | Path, dest: str | Path) -> Path:
    """Copy a trained pipeline folder to ``dest`` with the U-Net and VAE in fp16 (safetensors, one copy).

    Markdown files already in ``dest`` (its TRAINING.md) are kept; ``model_index.json`` names the folder.

    The text encoder stays fp32: transformers loads a checkpoint in its stored dtype, and an fp16 text
    encoder would hand fp16 states to the fp32 U-Net that diffusers makes from fp16 weights.

    Examples:
        >>> export_pipeline("/tmp/toy-train/pipeline", "src/opendaam/assets/toy-urban")  # doctest: +SKIP
    """
    import shutil

    from diffusers import DiffusionPipeline

    source, dest = Path(source), Path(dest)
    pipe = DiffusionPipeline.from_pretrained(str(source))
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for extra in source.glob("*.json"):
        if extra.name != "model_index.json":
            shutil.copy(extra, tmp / extra.name)
    for doc in dest.glob("*.md"):  # the folder's own documentation (TRAINING.md) stays
        shutil.copy(doc, tmp / doc.name)
    index = json.loads((tmp / "model_index.json").read_text())
    (tmp / "model_index.json").write_text(json.dumps({**index, "_name_or_path": dest.name}, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
