"""``fxstream.optimize``: compile the memory-heavy components of a whole diffusers video pipeline.

    pipe = DiffusionPipeline.from_pretrained("stabilityai/stable-video-diffusion-img2vid-xt", ...)
    fxstream.optimize(pipe, budget_gb=8)
    frames = pipe(image).frames[0]           # called exactly as before

Supported pipelines and the components compiled in each (the phases whose activations set the pipeline's
peak): ``StableVideoDiffusionPipeline``, ``AnimateDiffPipeline`` and ``TextToVideoSDPipeline``, each with its
``unet`` and its VAE decoder ``vae.decoder``; ``WanPipeline``, ``WanImageToVideoPipeline``,
``HunyuanVideoPipeline``, ``LTXPipeline``, ``CogVideoXPipeline`` and ``MochiPipeline`` with their
``transformer`` (sliced along its tokens) and their VAE's whole ``decode`` (``"vae.decode"``: their decodes loop
over latent frames around the decoder, so the loop is compiled with it; the compiled decode is set on the VAE
instance as its ``decode``). The VAE encoder and the text / image encoders stay eager: they run once per generation on one image or
one prompt, and their activations are far below the denoiser's and the decoder's
(``benchmarks/results/pipeline_cpu.md`` measures each phase). A VAE decode is compiled with the switches the
VAE has (``enable_tiling()``, framewise decoding): the output stays the pipeline's own; turn them off for the
exact whole decode, which fxstream streams within the budget (a warning says so when one is on).

One budget covers the whole pipeline. While a component runs, every other component's weights stay resident,
so each compiled component gets the budget minus the weights of all the other components (counted once per
storage; the VAE's encoder counts against its decoder). Tensors the pipeline itself holds between calls
(latents, prompt or image embeddings, frames already decoded when ``decode_chunk_size`` splits the decode) are
not counted: they are small beside the activations, except decoded frames at large sizes.

A compiled component compiles on its first call for each input signature and reuses that graph afterwards, so
``decode_chunk_size`` (SVD, AnimateDiff) and ``vae.enable_slicing()`` / ``enable_tiling()`` (AutoencoderKL)
keep working: each distinct chunk or tile shape compiles once.

Also here: :func:`build`, small random-weight pipelines of each supported kind built from configs (the zoo's
UNet and VAE configs, tiny CLIP encoders, a byte-level tokenizer), for tests and CPU benchmarks; nothing is
downloaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxstream import hooks
from fxstream.api import _TARGETS, budget_bytes_of
from fxstream.errors import BudgetError, UnsupportedModelError
from fxstream.module import StreamlinedModule, install, refuse_torch_compiled, uninstall
from passes.memory import format_bytes

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


# Pipeline class name -> dotted paths (from the pipeline) of the components compiled in it. A path ending in
# ".decode" is a VAE's decode method: the whole decode (a DiT-era VAE's own loops over latent frames included) is
# compiled as one module (models.VaeDecode) and put on the VAE instance in place of the method.
SUPPORTED_PIPELINES: dict[str, tuple[str, ...]] = {
    "StableVideoDiffusionPipeline": ("unet", "vae.decoder"),
    "AnimateDiffPipeline": ("unet", "vae.decoder"),
    "TextToVideoSDPipeline": ("unet", "vae.decoder"),
    # the DiT-era pipelines: the transformer and the VAE's whole decode
    "WanPipeline": ("transformer", "vae.decode"),
    "WanImageToVideoPipeline": ("transformer", "vae.decode"),
    "HunyuanVideoPipeline": ("transformer", "vae.decode"),
    "LTXPipeline": ("transformer", "vae.decode"),
    "CogVideoXPipeline": ("transformer", "vae.decode"),
    "MochiPipeline": ("transformer", "vae.decode"),
}
_DECODE = ".decode"


class CompiledDecode:
    """What :func:`optimize` puts on a VAE instance as its ``decode``: the compiled whole decode, called as the
    pipelines call ``vae.decode(z[, temb], return_dict=...)``, returning what the VAE's own decode returns.

    Like diffusers' ``apply_forward_hook`` on the method it replaces, it runs the VAE's accelerate hook first
    (model CPU offload moves the VAE in)."""

    def __init__(self, vae: nn.Module, compiled: StreamlinedModule):
        self.vae = vae
        self.compiled = compiled

    def __call__(self, z: torch.Tensor, temb: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        hook = getattr(self.vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.vae)
        sample = self.compiled(z) if temb is None else self.compiled(z, temb)
        return DecoderOutput(sample=sample) if return_dict else (sample,)


def _install(pipe: Any, path: str, original: nn.Module, compiled: StreamlinedModule) -> None:
    if path.endswith(_DECODE):
        vae = original.vae
        vae.__dict__["decode"] = CompiledDecode(vae, compiled)
        return
    if _get_path(pipe, path) is not original:
        _set_path(pipe, path, original)
    install(original, compiled)


def _uninstall(path: str, original: nn.Module) -> None:
    if path.endswith(_DECODE):
        if isinstance(original.vae.__dict__.get("decode"), CompiledDecode):
            del original.vae.__dict__["decode"]
        return
    uninstall(original)


class PipelineComponentModule(StreamlinedModule):
    """A :class:`~fxstream.module.StreamlinedModule` compiled as one component of a pipeline.

    It behaves exactly like one; only a budget that cannot be met is reported for the whole pipeline (the
    pipeline budget, the other components' weights, and the least the pipeline needs while this one runs)
    instead of for the component's share alone.
    """

    def __init__(self, module: nn.Module, *, budget_bytes: int | None, target: str | None, path: str,
                 pipeline: str, budget: int | None, other_weight_bytes: int, rehash: Any = None):
        super().__init__(module, budget_bytes=budget_bytes, chunks=None, target=target, rehash=rehash)
        self._fx_path = path
        self._fx_pipeline = pipeline
        self._fx_pipeline_budget = budget
        self._fx_other_weight_bytes = other_weight_bytes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)
        except BudgetError as e:
            least = self._fx_other_weight_bytes + e.min_peak_bytes
            raise BudgetError(
                f"{self._fx_pipeline} does not fit in {format_bytes(self._fx_pipeline_budget)}: while "
                f"{self._fx_path} runs it needs at least {format_bytes(least)}, of which the other "
                f"components' weights are {format_bytes(self._fx_other_weight_bytes)} ({self._fx_path}: {e})",
                min_peak_bytes=least,
                bounding_node=e.bounding_node,
            ) from e


@dataclass
class CompiledComponent:
    """One compiled component of a pipeline.

    path: where it sits, from the pipeline (``"unet"``, ``"vae.decoder"``, ``"vae.decode"``).
    module: the compiled module installed on the component: calls of the component run it.
    original: the component itself, still at ``path`` (the compiled module shares its parameters); for a
        ``".decode"`` path, the :class:`~fxstream.models.VaeDecode` of the VAE (the VAE is its ``.vae``).
    weight_bytes: the component's own parameters and buffers.
    other_weight_bytes: the weights of every other resident component of the pipeline.
    budget_bytes: what the component was compiled for: the pipeline budget minus ``other_weight_bytes``
        (None: as little memory as slicing can reach).
    """

    path: str
    module: PipelineComponentModule
    original: nn.Module
    weight_bytes: int
    other_weight_bytes: int
    budget_bytes: int | None

    @property
    def compiled_signatures(self) -> int:
        """How many input signatures have been compiled so far (chunked decodes compile one per shape)."""
        return len(self.module._fx_cache)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent capturing and planning, over every signature compiled so far."""
        return sum(entry.compile_seconds for entry in self.module._fx_cache.values())

    def pipeline_peaks(self) -> list[tuple[str, int, int]]:
        """(signature, baseline, planned) whole-pipeline peaks in bytes while this component runs: the other
        components' weights plus the component's own predicted peak, for each compiled signature."""
        return [
            (entry.plan.signature, self.other_weight_bytes + entry.plan.baseline_peak_bytes,
             self.other_weight_bytes + entry.plan.predicted_peak_bytes)
            for entry in self.module._fx_cache.values()
        ]


@dataclass
class PipelineOptimization:
    """What :func:`optimize` did to a pipeline; :meth:`restore` undoes it."""

    pipeline: Any
    budget_bytes: int | None
    resident_weight_bytes: int
    components: list[CompiledComponent] = field(default_factory=list)

    def component(self, path: str) -> CompiledComponent:
        for c in self.components:
            if c.path == path:
                return c
        compiled = ", ".join(c.path for c in self.components)
        raise KeyError(f"no compiled component {path!r}; compiled: {compiled}")

    @property
    def compile_seconds(self) -> float:
        return sum(c.compile_seconds for c in self.components)

    def report(self) -> str:
        """One row per compiled signature: predicted whole-pipeline peaks (resident weights + the running
        component's activations), baseline vs planned, and the groups sliced ("not called yet" before the
        component's first call)."""
        from tabulate import tabulate

        rows = []
        for c in self.components:
            entries = list(c.module._fx_cache.values())
            if not entries:
                rows.append([c.path, "(not called yet)", "", "", ""])
            for entry, (signature, baseline, planned) in zip(entries, c.pipeline_peaks()):
                rows.append([c.path, signature, format_bytes(baseline), format_bytes(planned),
                             len(entry.plan.sliced_groups)])
        budget = "minimum" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        head = (f"pipeline budget {budget}; resident weights {format_bytes(self.resident_weight_bytes)} "
                "(every component not offloaded while idle)")
        table = tabulate(rows, headers=["component", "input signature", "baseline peak", "planned peak",
                                        "sliced groups"], tablefmt="github")
        return f"{head}\n{table}"

    @property
    def rehash(self) -> Any:
        """The UNet's Step Rehash controller (None when rehash is off)."""
        for c in self.components:
            if c.path == "unet":
                return c.module.rehash
        return None

    def _hook_scheduler(self) -> None:
        """Start a generation on the controller whenever the pipeline sets its scheduler's timesteps (every
        diffusers pipeline call does, once, before its denoising loop)."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        controller = self.rehash
        if scheduler is None or controller is None:
            return
        set_timesteps = type(scheduler).set_timesteps.__get__(scheduler)

        @functools.wraps(set_timesteps)
        def hooked(*args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            controller.begin_generation(len(timesteps) if timesteps is not None else None)
            return out

        scheduler.__dict__["set_timesteps"] = hooked
        self._scheduler = scheduler

    def restore(self) -> None:
        """Put the original modules back: the pipeline is as it was before :func:`optimize`."""
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.__dict__.pop("set_timesteps", None)
            self._scheduler = None
        for c in self.components:
            _uninstall(c.path, c.original)
        self.components.clear()
        self.pipeline.__dict__.pop("_fxstream_optimization", None)


AUTO_BUDGET = "auto"


def optimize(
    pipe: DiffusionPipeline,
    budget_gb: float | str | None = AUTO_BUDGET,
    *,
    rehash: Any = None,
    target: str | None = None,
    offload: bool | str | torch.device = False,
) -> PipelineOptimization:
    """Compile ``pipe``'s UNet and VAE decoder in place so that the whole pipeline runs within ``budget_gb``.

    Args:
        pipe: one of :data:`SUPPORTED_PIPELINES` (SVD, AnimateDiff, ModelScope: UNet and VAE decoder; Wan,
            HunyuanVideo, LTX-Video, CogVideoX, Mochi: transformer and VAE decode).
        budget_gb: GiB for the whole pipeline: every component's weights plus the activations of the component
            that runs. ``"auto"`` (the default): what fits the device the pipeline runs on as it is now, so
            that only what must be sliced is (fastest): on CUDA its free memory and the allocator's reserve less
            the allocator's slack, on the CPU 90% of the available RAM plus the weights already loaded
            (:func:`fxstream.pipeline_plan.auto_budget_bytes`); the budget chosen is printed to stderr and kept
            in ``result.budget_bytes``. None or ``"min"``: as little memory as slicing can reach. Each compiled component gets this minus the weights of all the other components that stay
            on the device (components under ``enable_model_cpu_offload`` or group offloading to another device
            are not counted while idle: enable those before ``optimize``). Weights count at their stored size
            (``enable_layerwise_casting``: float8).
        rehash: Step Rehash for the UNet (off by default: it changes the output, by design): what
            :func:`fxstream.calibrate` returns (calibrate with a ``generate`` that calls this pipeline), or
            anything :func:`fxstream.compile` takes (``"auto"``: uncalibrated). Each pipeline call starts a new generation: when the pipeline sets
            its scheduler's timesteps, the controller is reset and told the step count, and each UNet call is
            the next step (the last step always runs in full). ``result.rehash`` is the controller.
        target: ``"cuda"`` or ``"cpu"``: whose attention kernels the memory model assumes (default: the
            device the components run on).
        offload: turn on diffusers' model CPU offload first (``pipe.enable_model_cpu_offload``; ``True``: on
            diffusers' default accelerator, or the device given): the components wait on the CPU and each moves
            to the device when it runs, so only the running one's weights count against the budget (what
            ``fxstream plan --pipeline NAME --offload`` plans). Needs accelerate; :meth:`PipelineOptimization.restore`
            leaves the offloading on.

    Returns:
        A :class:`PipelineOptimization` listing the compiled components; the pipeline is called exactly as
        before. Each component stays the very module it was (``pipe.unet`` is still the UNet: its class, its
        state_dict, diffusers' LoRA and switch APIs and ``save_pretrained`` see it as before); only calling it
        runs the compiled graph, guarded (:mod:`fxstream.guards`): a LoRA loaded or a switch set afterwards
        takes effect exactly as without fxstream. Each component compiles on its first call per input
        signature. Calling ``optimize`` again recompiles from the original modules.

    Raises:
        fxstream.errors.UnsupportedModelError: for a pipeline of another kind (the message lists the supported
            ones).
        ValueError: for a non-positive budget or an unknown target.
        fxstream.errors.BudgetError: now, when the budget does not cover the resident weights (the pipeline is
            left as it was); on a component's first call, when no plan fits its share.
    """
    from fxstream.runtime.rehash import as_config

    rehash_config = as_config(rehash)
    auto = isinstance(budget_gb, str) and budget_gb == AUTO_BUDGET
    budget_bytes = None if auto else budget_bytes_of(budget_gb)
    if target is not None and target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    paths = _component_paths(pipe)
    if offload is not False and offload is not None:
        _enable_offload(pipe, None if offload is True else offload)

    # Every share is checked before anything is replaced: a budget error leaves the pipeline as it was.
    modules = _pipeline_modules(pipe)
    resident = _storages(*modules)
    # components offloaded while idle (model CPU offload, group offloading to another device) hold nothing on
    # the compute device while another component runs
    away = {key for m in modules if hooks.away_while_idle(m) for key in _storages(m)}
    resident_bytes = sum(size for key, size in resident.items() if key not in away)
    if auto:
        budget_bytes = _auto_budget(pipe, resident_bytes)
    shares = []
    for path in paths:
        if path.endswith(_DECODE):  # the VAE's whole decode, as one module
            from fxstream.models import VaeDecode

            vae = _get_path(pipe, path[: -len(_DECODE)])
            refuse_torch_compiled(vae, path[: -len(_DECODE)])
            _warn_if_tiled(vae, path[: -len(_DECODE)])
            original = VaeDecode(vae)
        else:
            original = _get_path(pipe, path)
            if isinstance(original, StreamlinedModule):  # compiled with fxstream.compile: use the original
                original = original.original
            refuse_torch_compiled(original, path)
        own = _storages(original)
        own_bytes = sum(own.values())
        running = _storages(_get_path(pipe, path.split(".")[0]))  # the component it is part of, on the device
        other_bytes = other_weight_bytes(resident, own, away - running.keys())
        share = None if budget_bytes is None else budget_bytes - other_bytes
        if share is not None and share <= own_bytes:
            raise BudgetError(
                f"budget {format_bytes(budget_bytes)} does not cover the weights of {type(pipe).__name__}: "
                f"{format_bytes(resident_bytes)} resident in all, {format_bytes(own_bytes)} of them in "
                f"{path}, leaving nothing for its activations; raise budget_gb",
                min_peak_bytes=resident_bytes,
                bounding_node=path,
            )
        shares.append((path, original, own_bytes, other_bytes, share))

    previous = getattr(pipe, "_fxstream_optimization", None)
    if isinstance(previous, PipelineOptimization):
        previous.restore()
    result = PipelineOptimization(pipe, budget_bytes, resident_bytes)
    for path, original, own_bytes, other_bytes, share in shares:
        compiled = PipelineComponentModule(original, budget_bytes=share, target=target, path=path,
                                           pipeline=type(pipe).__name__, budget=budget_bytes,
                                           other_weight_bytes=other_bytes,
                                           rehash=rehash_config if path == "unet" else None)
        _install(pipe, path, original, compiled)
        result.components.append(CompiledComponent(path, compiled, original, own_bytes, other_bytes, share))
    if rehash_config is not None:
        result._hook_scheduler()
    # An instance attribute, not a pipeline component: a second optimize finds this one and undoes it first.
    object.__setattr__(pipe, "_fxstream_optimization", result)
    return result


def _auto_budget(pipe: Any, resident_bytes: int) -> int:
    """``budget_gb="auto"`` for ``pipe`` on the device it computes on (the offload device under model CPU
    offload), printed."""
    from fxstream.pipeline_plan import auto_budget_bytes

    offloaded = any("_hf_hook" in m.__dict__ for m in _pipeline_modules(pipe))
    device = getattr(pipe, "_offload_device", None) if offloaded else None
    return auto_budget_bytes(device or pipe.device, resident_bytes)


def _enable_offload(pipe: Any, device: str | torch.device | None) -> None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("optimize(pipe, offload=...) uses diffusers' enable_model_cpu_offload, which needs "
                          "accelerate: pip install 'fxstream[offload]'")
    pipe.enable_model_cpu_offload(device=device)


def _component_paths(pipe: Any) -> tuple[str, ...]:
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES and cls.__module__.startswith("diffusers."):
            return SUPPORTED_PIPELINES[cls.__name__]
    raise UnsupportedModelError(
        f"fxstream.optimize does not support {type(pipe).__name__}; supported pipelines: "
        f"{', '.join(SUPPORTED_PIPELINES)}. Other models: compile a module with fxstream.compile(module, "
        "budget_gb=...)"
    )


def _warn_if_tiled(vae: nn.Module, path: str) -> None:
    """Say so when a VAE decode is compiled with one of diffusers' memory switches on: it stays on (the output is
    the pipeline's own), and the switches that tile and blend change that output; fxstream needs none of them to
    fit the whole decode under the budget."""
    from fxstream.models import VAE_SWITCHES

    on = [flag for flag in VAE_SWITCHES if flag != "use_framewise_encoding" and getattr(vae, flag, False)]
    if on:
        import warnings

        warnings.warn(
            f"fxstream: {path} ({type(vae).__name__}) has {', '.join(on)} on: the compiled decode keeps them (the "
            f"pipeline's own output), and they decode in tiles or frame chunks that change the video at their "
            f"seams. For the exact whole decode within the budget, turn them off first ("
            + ", ".join(f"{path}.{flag} = False" for flag in on) + ")",
            stacklevel=3,
        )


def other_weight_bytes(resident: dict[tuple, int], own: dict[tuple, int], away: set | frozenset = frozenset()) -> int:
    """The weights on the device while a module runs that are not its own: every resident storage (as
    :func:`_storages` keys them) but the module's and those offloaded while idle (``away``; the rest of the
    running module's own component is never away). The one rule :func:`optimize` and
    :func:`fxstream.plan_pipeline` share."""
    return sum(size for key, size in resident.items() if key not in own and key not in away)


def _pipeline_modules(pipe: Any) -> list[nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, nn.Module)]


def _storages(*modules: nn.Module) -> dict[tuple, int]:
    """Bytes of each distinct storage among the modules' parameters and buffers (shared ones count once)."""
    out: dict[tuple, int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "meta":  # no storage to share: each tensor is its own
                out[("meta", None, id(t))] = t.numel() * t.element_size()
                continue
            storage = t.untyped_storage()
            out[(t.device.type, t.device.index, storage.data_ptr())] = storage.nbytes()
    return out


def _get_path(pipe: Any, path: str) -> nn.Module:
    obj = pipe
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UnsupportedModelError(f"{type(pipe).__name__} has no component {path!r} to compile")
    return obj


def _set_path(pipe: Any, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    owner = pipe
    for part in parents:
        owner = getattr(owner, part)
    if owner is pipe:
        # DiffusionPipeline.__setattr__ would record the wrapper's class in pipe.config (as the component's
        # library and class), which save_pretrained and from_pretrained then follow; the component is still
        # the diffusers model, wrapped, so the config is left as it was.
        object.__setattr__(pipe, name, module)
    else:
        setattr(owner, name, module)


# ------------------------------------------------------------------------------------------------------------
# Random-weight pipelines from configs (tests, CPU benchmarks).

PIPELINE_NAMES = ("svd", "svd-xt", "animatediff", "modelscope", "wan", "wan-i2v", "hunyuanvideo", "ltx",
                  "cogvideox", "mochi", "wan2.1-1.3b", "wan2.1-14b", "ltx-video", "cogvideox-5b")
# fxstream.dit_pipelines.build_full: the released DiT-era pipelines, full size only ("mochi" is both: tiny there)
_FULL_ONLY = ("wan2.1-1.3b", "wan2.1-14b", "ltx-video", "cogvideox-5b")
_SIZES = ("tiny", "medium", "full")
_DIT_PIPELINES = PIPELINE_NAMES[4:10]  # fxstream.dit_pipelines: tiny only
# Text encoders: CLIP's sequence length (the pipelines pad prompts to tokenizer.model_max_length).
_TEXT_SEQ_LEN = 77
# The released pipelines' encoders, for size "full" (transformers configs). SVD's image encoder: CLIP ViT-H/14
# with projection (stable-video-diffusion-img2vid image_encoder/config.json), 632,076,800 parameters.
CLIP_VISION_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
# AnimateDiff's (SD-1.5's) text encoder: CLIP ViT-L/14's, 123,060,480 parameters.
CLIP_TEXT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
# ModelScope's (damo-vilab/text-to-video-ms-1.7b text_encoder/config.json): OpenCLIP ViT-H/14's text tower,
# 23 layers of 1024, 340,387,840 parameters.
OPEN_CLIP_TEXT_H14 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, projection_dim=512, hidden_act="gelu")
# SVD's scheduler (stabilityai/stable-video-diffusion-img2vid scheduler/scheduler_config.json).
_SVD_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)
# AnimateDiff's and ModelScope's DDIM settings (the model cards' scheduler configs).
_ANIMATEDIFF_SCHEDULER = dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace",
                              steps_offset=1)
_MODELSCOPE_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             clip_sample=False, set_alpha_to_one=False)


def build(name: str, size: str = "tiny", *, seed: int = 0, dtype: torch.dtype | None = None,
          device: str | torch.device | None = None) -> DiffusionPipeline:
    """A ``name`` pipeline (one of :data:`PIPELINE_NAMES`), random weights, on the CPU (fp32 unless ``dtype``).

    SVD (``"svd"``, and ``"svd-xt"``: its 25-frame UNet), AnimateDiff, ModelScope: the UNet and VAE decoder take
    the zoo's configs at ``size`` (``"tiny"`` or ``"medium"``, see :mod:`fxstream.models`); the VAE encoder
    mirrors the decoder, the CLIP encoders have one layer, and the tokenizer is byte-level with no merges (every
    byte one token). ``"full"``: every component at its released size (the model cards' configs, the CLIP
    encoders the released pipelines load) on the meta device, no weights and no memory, for planning
    (:func:`fxstream.plan_pipeline`; ``device="cuda"`` builds it there, random weights, for GPU measurements);
    ``dtype`` defaults to fp16 there; ``"wan2.1-1.3b"``, ``"wan2.1-14b"``,
    ``"ltx-video"``, ``"cogvideox-5b"`` and ``"mochi"`` at ``"full"``: the released DiT-era text-to-video pipelines,
    their T5 / UMT5 text encoders included (:func:`fxstream.dit_pipelines.build_full`). Wan (``"wan"``, image-to-video
    ``"wan-i2v"``), HunyuanVideo, LTX-Video, CogVideoX, Mochi: tiny only, see :mod:`fxstream.dit_pipelines` (and
    its calls: ``max_sequence_length=dit_pipelines.TEXT_SEQ_LEN``). Nothing is downloaded.
    """
    from fxstream import models

    if name not in PIPELINE_NAMES:
        raise ValueError(f"name: unknown pipeline {name!r}; expected one of {', '.join(PIPELINE_NAMES)}")
    sizes = (("tiny", "full") if name == "mochi" else ("tiny",) if name in _DIT_PIPELINES
             else ("full",) if name in _FULL_ONLY else _SIZES)
    if size not in sizes:
        raise ValueError(f"size: expected one of {', '.join(sizes)} for {name}, got {size!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    # "full" defaults to the meta device; given a device (a GPU), it is built there with random weights
    device = torch.device(device or ("meta" if size == "full" else "cpu"))
    dtype = dtype or (torch.float16 if size == "full" else torch.float32)
    with models._quiet_diffusers(), torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(seed)
        if name in _DIT_PIPELINES or name in _FULL_ONLY:
            from fxstream import dit_pipelines

            pipe = dit_pipelines.build_full(name) if size == "full" else dit_pipelines.build(name, size)
        else:
            builders = {"svd": functools.partial(_build_svd, unet_name="svd"),
                        "svd-xt": functools.partial(_build_svd, unet_name="svd-xt"),
                        "animatediff": _build_animatediff, "modelscope": _build_modelscope}
            pipe = builders[name](size)
        for module in _pipeline_modules(pipe):
            if size != "full":
                models._rerandomize_zero_layers(module)
            # parameters made outside the device context (SVD's AlphaBlender) follow the others
            module.to(device=device, dtype=dtype)
            module.eval()
            module.requires_grad_(False)
    return pipe


def _build_svd(size: str, unet_name: str = "svd") -> DiffusionPipeline:
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from diffusers import UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from fxstream import models

    unet = UNetSpatioTemporalConditionModel(**models.ZOO[unet_name].configs[size])
    decoder = models.ZOO["svd-vae-decoder"].configs[size]
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=decoder["block_out_channels"], layers_per_block=decoder["layers_per_block"],
        down_block_types=("DownEncoderBlock2D",) * len(decoder["block_out_channels"]), latent_channels=4,
    )
    width = unet.config.cross_attention_dim
    # The pipeline resizes the image to 224x224 for CLIP; patches of 32 pixels: 49 tokens.
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        **CLIP_VISION_H14 if size == "full" else dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
            image_size=224, patch_size=32, projection_dim=width)
    ))
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=_scheduler(EulerDiscreteScheduler, _SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )


def _build_animatediff(size: str) -> DiffusionPipeline:
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    from fxstream import models

    config = models.ZOO["animatediff"].configs[size]
    unet = UNet2DConditionModel(**config["unet"])
    return AnimateDiffPipeline(
        vae=_sd_vae(size), text_encoder=_text_encoder(unet.config.cross_attention_dim, size, CLIP_TEXT_L14),
        tokenizer=_tokenizer(), unet=unet, motion_adapter=MotionAdapter(**config["motion_adapter"]),
        scheduler=_scheduler(DDIMScheduler, _ANIMATEDIFF_SCHEDULER),
    )


def _build_modelscope(size: str) -> DiffusionPipeline:
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    from fxstream import models

    unet = UNet3DConditionModel(**models.ZOO["modelscope"].configs[size])
    return TextToVideoSDPipeline(
        vae=_sd_vae(size), text_encoder=_text_encoder(unet.config.cross_attention_dim, size, OPEN_CLIP_TEXT_H14),
        tokenizer=_tokenizer(), unet=unet, scheduler=_scheduler(DDIMScheduler, _MODELSCOPE_SCHEDULER),
    )


def _scheduler(cls: type, config: dict) -> Any:
    """A scheduler, its tables on the CPU even while the modules are built on the meta device."""
    with torch.device("cpu"):
        return cls(**config)


def _sd_vae(size: str) -> nn.Module:
    from diffusers import AutoencoderKL

    from fxstream import models

    decoder = models.ZOO["sd-vae-decoder"].configs[size]
    levels = len(decoder["block_out_channels"])
    return AutoencoderKL(
        block_out_channels=decoder["block_out_channels"], layers_per_block=decoder["layers_per_block"],
        norm_num_groups=decoder["norm_num_groups"], down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=decoder["up_block_types"], latent_channels=4,
    )


# Token ids of the byte-level vocabulary below.
_BOS, _EOS = 0, 1


def _tokenizer() -> Any:
    """A CLIP tokenizer over bytes: the 256 byte symbols, as word pieces and as word ends, and no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": _BOS, "<|endoftext|>": _EOS}
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TEXT_SEQ_LEN)


def _text_encoder(width: int, size: str = "tiny", full: dict | None = None) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    if size == "full" and full is not None:
        return CLIPTextModel(CLIPTextConfig(**full, max_position_embeddings=_TEXT_SEQ_LEN))
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=2 + 2 * 256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=_TEXT_SEQ_LEN, projection_dim=width,
        bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_EOS,
    ))
