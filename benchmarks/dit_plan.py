"""Predicted activation memory of one call of the full-size video transformers: eager vs fxstream's minimum.

    python benchmarks/dit_plan.py                       # every model; writes benchmarks/results/dit_plan.md
    python benchmarks/dit_plan.py --models wan2.1-14b --layers 2 --out /tmp/dit_plan.md

Predictions of ``passes/memory.py`` on the real configs (the checkpoints' ``transformer/config.json``) built on
the ``meta`` device (no weights, no GPU): bf16, target CUDA (flash / memory-efficient SDPA), batch 1 (these
pipelines run the two guidance branches as two calls), at the pipelines' default sizes. Activations only:
the weights are resident either way. ``--layers`` builds fewer blocks (same widths, same tokens) for a quick
look; the table says how many ran. Plan time is the wall time of ``fxstream.plan`` (capture included) here,
with the plan cache off.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ["FXSTREAM_PLAN_CACHE"] = "0"  # plan every time: the plan time is part of the table
import fxstream  # noqa: E402
from common import gib, write_results  # noqa: E402

DTYPE = torch.bfloat16


def _wan(heads: int, layers: int, ffn: int):
    def build(n_layers: int | None, frames: int, height: int, width: int):
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=n_layers or layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )
        latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)  # WanPipeline.prepare_latents
        kwargs = dict(hidden_states=torch.empty(latent, dtype=DTYPE), timestep=torch.empty(1),
                      encoder_hidden_states=torch.empty(1, 512, 4096, dtype=DTYPE))  # UMT5, 512 tokens
        return model, kwargs, layers
    return build


def _hunyuan(n_layers: int | None, frames: int, height: int, width: int):
    from diffusers import HunyuanVideoTransformer3DModel

    double, single = (n_layers, 2 * n_layers) if n_layers else (20, 40)
    model = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=double,
        num_single_layers=single, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
        rope_theta=256.0, rope_axes_dim=(16, 56, 56),
    )
    latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    kwargs = dict(hidden_states=torch.empty(latent, dtype=DTYPE), timestep=torch.empty(1),
                  encoder_hidden_states=torch.empty(1, 256, 4096, dtype=DTYPE),  # Llama prompt, 256 tokens
                  encoder_attention_mask=torch.empty(1, 256, dtype=DTYPE),
                  pooled_projections=torch.empty(1, 768, dtype=DTYPE), guidance=torch.empty(1))
    return model, kwargs, 20 + 40


# name: (builder, frames, height, width); Wan 2.1's T2V defaults 81 frames; 720p for the 14B, 480p for the 1.3B
MODELS = {
    "wan2.1-1.3b": (_wan(12, 30, 8960), 81, 480, 832),
    "wan2.1-14b": (_wan(40, 40, 13824), 81, 720, 1280),
    "hunyuanvideo": (_hunyuan, 129, 720, 1280),
}


def run(name: str, layers: int | None) -> list:
    builder, frames, height, width = MODELS[name]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs, full_layers = builder(layers, frames, height, width)
        model = model.to(DTYPE).eval().requires_grad_(False)
    start = time.perf_counter()
    plan = fxstream.plan(model, target="cuda", **kwargs)
    seconds = time.perf_counter() - start
    tokens = kwargs["hidden_states"].shape[2] * (height // 16) * (width // 16)
    eager, low = plan.baseline_activation_peak_bytes, plan.predicted_activation_peak_bytes
    return [name, f"{frames} x {height}x{width}", tokens, "all" if layers is None else f"{layers} of {full_layers}",
            gib(eager), gib(low), f"{100 * low / eager:.0f}%", len(plan.sliced_groups), f"{seconds:.0f}",
            f"{plan.peak_node} in {plan.peak_module_path or '<top level>'}"]


HEADERS = ["model", "frames x size", "tokens", "blocks", "eager act. GiB", "fxstream min act. GiB", "min / eager",
           "sliced groups", "plan s", "bounded at"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="build this many blocks (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dit_plan.md"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows.append(run(name, args.layers))
        print(tabulate([rows[-1]], HEADERS), flush=True)
    table = tabulate(rows, HEADERS, tablefmt="github")
    print(table)
    write_results(args.out, "Full-size video transformers: predicted activation peak of one call, eager vs fxstream",
                  ["Predicted on meta (bf16, target CUDA, batch 1); see benchmarks/dit_plan.py.", "", table])


if __name__ == "__main__":
    main()
