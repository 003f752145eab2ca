"""Train one of fxstream's tiny reference models on procedurally generated clips (not part of CI).

    python scripts/train_reference.py --model svd --minutes 40 --threads 1
    python scripts/train_reference.py --model animatediff --minutes 40 --threads 1
    python scripts/train_reference.py --model decoder --minutes 20 --threads 1 --lr 1e-3

Writes ``fxstream/weights/<model>.safetensors`` (the EMA weights, with this command, the step count and the
final loss in its metadata; rewritten every few minutes, so an interrupted run still leaves a usable file) and
``docs/reference/<model>.png`` / ``.gif`` (samples from the saved weights: 25 steps, 4 seeds). See
:mod:`fxstream.reference` for the models, the data and the samplers.

Parameterisations (what the samplers in fxstream.reference expect):

* svd: EDM with v-prediction, exactly what diffusers' ``EulerDiscreteScheduler`` assumes for SVD: the UNet
  sees ``x / sqrt(sigma^2 + 1)`` and timestep ``0.25 * log(sigma)``; ``x0 = x / (sigma^2 + 1) - sigma /
  sqrt(sigma^2 + 1) * F``. log(sigma) ~ N(0.3, 1.6), with 10% drawn uniformly over the sampler's range. The
  conditioning (first frame and its embedding) is dropped 10% of the time for classifier-free guidance.
* animatediff: DDPM betas of SD-1.5 with v-prediction; the class prompt is replaced by the empty prompt 10% of
  the time.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxstream import reference as ref  # noqa: E402


def svd_loss(unet, conditioner, clips, g):
    b = clips.shape[0]
    frame = clips[:, 0] + ref.SVD_NOISE_AUG * torch.randn(clips[:, 0].shape, generator=g)
    emb = conditioner(frame)
    keep = (torch.rand(b, generator=g) > 0.1).float()
    emb = emb * keep[:, None, None]
    cond = (frame * keep[:, None, None, None])[:, None].expand(-1, clips.shape[1], -1, -1, -1)
    log_sigma = torch.randn(b, generator=g) * 1.6 + 0.3
    uniform = torch.rand(b, generator=g) < 0.1
    lo, hi = math.log(ref.SVD_SCHEDULER["sigma_min"]), math.log(ref.SVD_SCHEDULER["sigma_max"])
    log_sigma = torch.where(uniform, lo + (hi - lo) * torch.rand(b, generator=g), log_sigma).clamp(lo, hi)
    sigma = log_sigma.exp()[:, None, None, None, None]
    noisy = clips + sigma * torch.randn(clips.shape, generator=g)
    c_in = 1 / torch.sqrt(sigma**2 + 1)
    c_skip = 1 / (sigma**2 + 1)
    c_out = -sigma / torch.sqrt(sigma**2 + 1)
    target = (clips - c_skip * noisy) / c_out
    ids = torch.tensor([ref.SVD_ADDED_TIME_IDS] * b)
    out = unet(torch.cat([noisy * c_in, cond], dim=2), 0.25 * log_sigma, encoder_hidden_states=emb,
               added_time_ids=ids, return_dict=False)[0]
    return torch.mean((out - target) ** 2)


class DDPM:
    def __init__(self):
        from diffusers import DDPMScheduler

        s = DDPMScheduler(**ref.DDPM_BETAS)
        self.alphas_cumprod = s.alphas_cumprod


def animatediff_loss(unet, conditioner, clips, classes, g, ddpm):
    b = clips.shape[0]
    classes = torch.where(torch.rand(b, generator=g) < 0.1, torch.full_like(classes, -1), classes)
    prompts = conditioner(classes).repeat_interleave(clips.shape[1], dim=0)
    t = torch.randint(0, 1000, (b,), generator=g)
    ab = ddpm.alphas_cumprod[t][:, None, None, None, None]
    x0 = clips.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
    eps = torch.randn(x0.shape, generator=g)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    out = unet(noisy, t, encoder_hidden_states=prompts, return_dict=False)[0]
    return torch.mean((out - target) ** 2)


def save_samples(name: str, weights: Path, out_dir: Path, steps: int = 25, seeds: int = 4) -> Path:
    """A frame strip (rows: samples of seeds 0..seeds-1, columns: frames) and a GIF of the same samples side by
    side. For svd, the first column is the conditioning frame (the first frame of a clip the model continues),
    set apart by a wider gap; the GIF shows it beside each sample."""
    import imageio.v2 as imageio
    import numpy as np

    model = ref.load(name, weights)
    rows, conds = [], []
    for seed in range(seeds):
        video = model.sample(steps=steps, seed=seed)[0]  # (F, 4, H, W)
        rows.append(ref.to_rgb(video))  # (F, H, W, 3)
        conds.append(ref.to_rgb(model.condition(seed)[0][0, 0]))  # (H, W, 3)
    scale = 8

    def big(t: torch.Tensor) -> np.ndarray:
        return t.repeat_interleave(scale, dim=-3).repeat_interleave(scale, dim=-2).numpy()

    frames, cond = big(torch.stack(rows)), big(torch.stack(conds))  # (S, F, h, w, 3), (S, h, w, 3)

    def gap(width: int) -> np.ndarray:
        return np.full((frames.shape[2], width, 3), 255, dtype=np.uint8)

    lines = []
    for s in range(seeds):
        parts = [cond[s], gap(8)] if name == "svd" else []
        for f in range(frames.shape[1]):
            parts += [frames[s, f], gap(2)]
        lines.append(np.concatenate(parts, axis=1))
    strip = np.concatenate([np.concatenate([line, np.full((2,) + line.shape[1:], 255, np.uint8)], axis=0)
                            for line in lines], axis=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    imageio.imwrite(png, strip)
    gif_frames = []
    for f in range(frames.shape[1]):
        tiles = [np.concatenate([cond[s], gap(4), frames[s, f]], axis=1) if name == "svd" else frames[s, f]
                 for s in range(seeds)]
        gif_frames.append(np.concatenate([np.concatenate([t, gap(4)[:, :4]], axis=1) for t in tiles], axis=1))
    imageio.mimsave(out_dir / f"{name}.gif", gif_frames, duration=0.25, loop=0)
    return png


def train(args, models: list[tuple[torch.nn.Module, torch.nn.Module]], loss_fn, save, every: int = 100):
    """AdamW with a 200-step warm-up, gradient clipping and an EMA of each (model, ema) pair, until
    ``args.minutes`` have passed; ``save(ema models, metadata)`` every ``args.save_every`` minutes and at the end.
    ``loss_fn(step)`` draws a batch and returns its loss. Returns (steps, final loss EMA)."""
    params = [p for m, _ in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    command = "python scripts/train_reference.py " + " ".join(shlex.quote(a) for a in args.argv)
    start = last_save = time.time()
    deadline = start + args.minutes * 60
    step, avg = 0, None

    def checkpoint(final: bool) -> None:
        save({"command": command, "steps": str(step), "loss_ema": f"{avg:.5f}",
              "minutes": f"{(time.time() - start) / 60:.1f}", "torch": torch.__version__, "final": str(final)})

    while time.time() < deadline:
        loss = loss_fn(step)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in models:
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        step += 1
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if step % every == 0:
            print(f"step {step} loss {avg:.4f} ({step / (time.time() - start):.2f} steps/s)", flush=True)
        if time.time() - last_save > args.save_every * 60:
            checkpoint(False)
            last_save = time.time()
    checkpoint(True)
    return step, avg


def train_decoder(args, out: Path) -> int:
    """The decoder: the 16x16 clips to the same clips rendered at 128x128 (L1 on RGB), inputs jittered with a
    little noise so that imperfect samples decode cleanly too."""
    decoder = ref.build_decoder(seed=args.seed).train()
    ema = copy.deepcopy(decoder).eval()
    g = torch.Generator().manual_seed(args.seed)
    clips_per_step = max(1, args.batch // ref.FRAMES)

    def loss_fn(step: int) -> torch.Tensor:
        state = g.get_state()
        small, _ = ref.make_clips(clips_per_step, generator=g)
        g_big = torch.Generator()
        g_big.set_state(state)  # the same draws: the same scene, rendered larger
        big, _ = ref.make_clips(clips_per_step, generator=g_big, scale=ref.DECODER_SCALE)
        x = small.flatten(0, 1)
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        return (decoder(x) - big.flatten(0, 1)[:, :3]).abs().mean()

    steps, avg = train(args, [(decoder, ema)], loss_fn, lambda meta: ref.save_decoder(out, ema, meta), every=50)
    print(f"saved {out} after {steps} steps, loss {avg:.4f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=(*ref.NAMES, ref.DECODER_NAME), required=True,
                   help="a reference UNet, or the decoder that turns their latents into 128x128 RGB frames")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock training time")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: fxstream/weights/<model>.safetensors")
    p.add_argument("--samples-dir", type=Path, default=ROOT / "docs" / "reference")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--samples-only", action="store_true",
                   help="do not train: write the sample strip and GIF of the existing weights")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or ref.weights_path(args.model)
    if args.model == ref.DECODER_NAME:
        if args.samples_only:
            raise SystemExit("--samples-only: the decoder's samples are fxstream generate's videos")
        out.parent.mkdir(parents=True, exist_ok=True)
        return train_decoder(args, out)
    if args.samples_only:
        png = save_samples(args.model, out, args.samples_dir)
        print(f"samples: {png} and {png.with_suffix('.gif')}", flush=True)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    unet = ref.build_unet(args.model, seed=args.seed).train()
    conditioner = ref.build_conditioner(args.model).train()
    ema_unet, ema_cond = copy.deepcopy(unet).eval(), copy.deepcopy(conditioner).eval()
    g = torch.Generator().manual_seed(args.seed)
    ddpm = DDPM() if args.model == "animatediff" else None

    def loss_fn(step: int) -> torch.Tensor:
        clips, classes = ref.make_clips(args.batch, generator=g)
        if args.model == "svd":
            return svd_loss(unet, conditioner, clips, g)
        return animatediff_loss(unet, conditioner, clips, classes, g, ddpm)

    steps, avg = train(args, [(unet, ema_unet), (conditioner, ema_cond)], loss_fn,
                       lambda meta: ref.save(out, args.model, ema_unet, ema_cond, meta))
    print(f"saved {out} after {steps} steps, loss {avg:.4f}", flush=True)
    png = save_samples(args.model, out, args.samples_dir)
    print(f"samples: {png} and {png.with_suffix('.gif')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
