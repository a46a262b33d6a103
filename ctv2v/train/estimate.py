"""What one training micro-batch costs: random clips of the configured shapes through the real objective.

Peak GPU memory is estimated without a GPU (FIELD_NOTES "Estimating GPU memory without a GPU"): the model and
its AdamW optimizer are built under FakeTensorMode on CPU, the forward pass runs under fp16 autocast, and
torch's MemTracker records the peak tensor memory of one training step with the optimizer state already in
place. Not seen by the tracker: the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation; `fit`
adds a stated allowance for them (CONTEXT_ALLOWANCE_BYTES, FRAGMENTATION_SHARE).

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over the forward and backward pass of one
micro-batch of DiffusionObjective, the module the training loop optimizes. The model is built and run under
FakeTensorMode (shapes only, no arithmetic), so even the V100 presets are counted in seconds; the counts
depend only on shapes, and tests check they match a real run. Benchmarks time and measure the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import yaml
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.optim.swa_utils import AveragedModel
from torch.utils.flop_counter import FlopCounterMode

from ctv2v.config import V100_16GB_PRODUCTS, V100_32GB_PRODUCTS, VARIANTS, RunConfig
from ctv2v.config_io import deep_merge, validate
from ctv2v.models.summary import clip_shapes, format_model_summary, summarize_model
from ctv2v.models.v2v import VideoToVideoDiffusion, build_model
from ctv2v.models.vae import build_untrained_vae
from ctv2v.train.objectives import DiffusionObjective

Phase = Literal["frozen", "full"]


def phase_batch(config: RunConfig, phase: Phase) -> int:
    """Micro-batch size of a training phase."""
    settings = config.training.frozen if phase == "frozen" else config.training.full
    return settings.batch_for(config.variant)


def set_phase(model: VideoToVideoDiffusion, phase: Phase) -> None:
    """Freeze (frozen phase) or unfreeze (full phase) the VAE, and put the model in training mode."""
    if phase == "frozen":
        model.freeze_vae()
    else:
        model.unfreeze_vae()
    model.train()


def random_batch(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
                 batch: int | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch of random data shaped as the training data of `phase` is (`batch` clips, default the phase's).

    The frozen phase trains on cached latents when training.latent_cache is on (no VAE pass at all).
    """
    thick_shape, thin_shape = clip_shapes(config, phase_batch(config, phase) if batch is None else batch)
    device = model.vae.latent_scale.device
    if phase == "frozen" and config.training.latent_cache:
        return {"thick_latent": torch.randn(model.vae.latent_shape(thick_shape), device=device),
                "thin_latent": torch.randn(model.vae.latent_shape(thin_shape), device=device)}
    thin = torch.rand(thin_shape, device=device)
    batch = {"thick": thin[:, :, :: config.data.thick.factor], "thin": thin}
    if model.interpolation is not None:  # the model also encodes the interpolated clip
        batch["interp"] = torch.rand(thin_shape, device=device)
    return batch


def step_loss(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
              autocast: torch.dtype | None = None, batch_size: int | None = None) -> torch.Tensor:
    """The objective's loss on one random micro-batch of `phase` (the model must be set to it).

    `autocast` runs it under torch.autocast with that dtype (fp16 on V100); `batch_size` defaults to the phase's.
    """
    batch = random_batch(model, config, phase, batch_size)
    device = model.vae.latent_scale.device
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with precision:
        return DiffusionObjective(model)(batch)[0]


def training_step(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
                  optimizer: torch.optim.Optimizer | None = None, autocast: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Forward + backward (+ optimizer step) of one random micro-batch, as `phase` trains."""
    set_phase(model, phase)
    loss = step_loss(model, config, phase, autocast)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def count_step_flops(config: RunConfig, phase: Phase, fake: bool = True) -> int:
    """FLOPs of one training micro-batch (forward + backward) of `phase`; `fake` counts shapes only."""
    def run() -> int:
        model = build_model(config, build_untrained_vae(config))
        with FlopCounterMode(display=False) as counter:
            training_step(model, config, phase)
        return counter.get_total_flops()

    if fake:
        with FakeTensorMode():
            return run()
    return run()


def count_sample_flops(config: RunConfig, size: tuple[int, int, int], batch: int = 1, fake: bool = True) -> int:
    """FLOPs of the network passes of one model.sample call (the evaluation sampling steps) on `batch` clips of `size`
    thin (frames, rows, columns): what predicting one batch of inference tiles costs; `fake` counts shapes only.

    The passes are made one by one (encoding the inputs, one denoiser pass per step, decoding): the sampler's
    loop reads its timesteps as Python numbers, which tensors without data cannot give; its own arithmetic is
    elementwise, which FlopCounterMode does not count either way.
    """
    frames, rows, cols = size
    factor = config.data.thick.factor

    def run() -> int:
        model = build_model(config, build_untrained_vae(config)).eval()
        thick = torch.rand(batch, 1, frames // factor, rows, cols)
        interp = torch.rand(batch, 1, frames, rows, cols) if model.interpolation is not None else None
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            condition, source, interp_latent = model.input_latents(thick, interp)
            latent = torch.rand(model.vae.latent_shape((batch, 1, *size))) if source is None else source
            timesteps = torch.zeros(batch, dtype=torch.long)
            for _ in range(config.evaluation_sample_steps):
                latent = model.denoiser(latent, condition, timesteps)
            model.decode_output(latent, size, interp, interp_latent)
        return counter.get_total_flops()

    if fake:
        with FakeTensorMode():
            return run()
    return run()


def summarize(config: RunConfig) -> dict[str, Any]:
    """The model summary (ctv2v.models.summary) plus each phase's micro-batch size and FLOPs per training step."""
    phases = {}
    for phase in ("frozen", "full"):
        phases[phase] = {
            "batch_size": phase_batch(config, phase),
            "flops": count_step_flops(config, phase),
            "vae_in_step": "trainable" if phase == "full" else (
                "none (cached latents)" if config.training.latent_cache else "frozen (forward only)"),
        }
    return {**summarize_model(config), "phases": phases,
            "flops_method": "FlopCounterMode under FakeTensorMode (shapes only, no arithmetic)"}


def format_summary(summary: dict[str, Any]) -> str:
    """summarize's result as an aligned text table."""
    lines = format_model_summary(summary)
    for phase, info in summary["phases"].items():
        lines.append(
            f"{phase + ' step':<19}batch {info['batch_size']}: {info['flops'] / 1e9:,.1f} GFLOP forward+backward "
            f"(VAE: {info['vae_in_step']})"
        )
    lines.append(f"FLOPs counted by   {summary['flops_method']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ GPU memory
CARDS: dict[str, int] = {"v100-16gb": 16 * 10**9, "v100-32gb": 32 * 10**9}
"""Card memory in bytes, taken as decimal GB: below the 16160 / 32510 MiB nvidia-smi reports for V100 SXM2."""
CARD_PRODUCTS: dict[str, tuple[str, ...]] = {"v100-16gb": V100_16GB_PRODUCTS, "v100-32gb": V100_32GB_PRODUCTS}
"""A preset's steps are scheduled on nodes with these `nvidia.com/gpu.product` labels: the batches fit no smaller card."""
CONTEXT_ALLOWANCE_BYTES = 2**30
"""Added to every estimate: the CUDA context (~0.3-0.5 GiB with torch's kernels loaded) and cuDNN/cuBLAS
workspaces, which the tracker does not see. An assumption, not measured here (no GPU)."""
FRAGMENTATION_SHARE = 0.10
"""Added to every estimate as a share of the tracked tensor peak: the caching allocator's fragmentation."""
DEFAULT_SHARE = 0.85
"""`fit` keeps the estimated peak under this share of the card."""
FILL_FLOOR = 0.60
"""Below this share of the card a phase leaves most of the GPU's memory idle: `fit` then tries gradient
checkpointing, which frees activation memory for a larger micro-batch (the preset target is 60-90 %)."""


class _StepForward(nn.Module):
    """One training forward pass as a module call: MemTracker refuses a module called twice at top level (the
    VAE encodes thin and thick clips), but accepts repeated calls below a parent module."""

    def __init__(self, model: VideoToVideoDiffusion, config: RunConfig, phase: Phase):
        super().__init__()
        self.model, self.config, self.phase = model, config, phase
        self.batch_size: int | None = None

    def forward(self) -> torch.Tensor:
        return step_loss(self.model, self.config, self.phase, autocast=torch.float16, batch_size=self.batch_size)


def estimate_peak_bytes(config: RunConfig, phase: Phase, batch_sizes: Sequence[int] | None = None) -> list[int]:
    """Tracked peak tensor bytes of one fp16-autocast training step of `phase` per batch size, from shapes only.

    The model, AdamW (its state already allocated, as from the second step on) and the EMA copy
    (training.ema_decay) are built once under FakeTensorMode; each batch size is one tracked step.
    `batch_sizes` defaults to the phase's configured micro-batch.
    """
    sizes = list(batch_sizes) if batch_sizes is not None else [phase_batch(config, phase)]
    peaks = []
    with FakeTensorMode():
        model = build_model(config, build_untrained_vae(config))
        set_phase(model, phase)
        settings = config.training.frozen if phase == "frozen" else config.training.full
        multiplier = config.training.full.vae_lr_multiplier if phase == "full" else 0.0
        optimizer = torch.optim.AdamW(model.param_groups(settings.lr, multiplier, config.training.weight_decay))
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()  # allocates exp_avg / exp_avg_sq, which every later step holds
        optimizer.zero_grad(set_to_none=True)
        ema = AveragedModel(model.denoiser) if config.training.ema_decay is not None else None
        if phase == "frozen":
            # MemTracker hooks the gradient of every parameter of a called module and fails on frozen ones. The
            # frozen VAE still runs under no_grad and is not in the optimizer, so no gradient ever materializes.
            model.vae.requires_grad_(True)
        step = _StepForward(model, config, phase)
        for size in sizes:
            step.batch_size = size
            tracker = MemTracker()
            tracker.track_external(*(m for m in (model, ema) if m is not None), optimizer)
            with tracker:
                step().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            peaks.append(max(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values()))
    return peaks


def with_allowance(tracked_bytes: int) -> int:
    """A tracked tensor peak plus the allowance for the CUDA context, workspaces and fragmentation."""
    return int(tracked_bytes * (1 + FRAGMENTATION_SHARE)) + CONTEXT_ALLOWANCE_BYTES


@dataclass(frozen=True)
class PhaseFit:
    """The micro-batch `fit` chose for one variant and phase, and its estimated peak (allowance included)."""

    variant: str
    phase: Phase
    batch_size: int
    peak_bytes: int
    card_bytes: int

    @property
    def share(self) -> float:
        """Estimated peak as a share of the card."""
        return self.peak_bytes / self.card_bytes


@dataclass(frozen=True)
class CardFit:
    """A card preset: the overlay `fit` derived and the estimate behind each of its batches."""

    card: str
    share: float
    overlay: dict[str, Any]
    phases: list[PhaseFit]


def _largest_fitting(estimate: Callable[[list[int]], list[int]], budget: int) -> tuple[int, int] | None:
    """(batch, estimated peak) of the largest batch whose estimate stays within `budget`; None if batch 1 does not.

    Peak memory grows about linearly with the batch (activations) on top of a fixed part (weights, gradients,
    optimizer state): each guess follows the line through the nearest known points, and the largest batch
    known to fit and the smallest known not to bound the search, so a bend in the line costs a few more estimates.
    """
    one, two = (with_allowance(b) for b in estimate([1, 2]))
    if one > budget:
        return None
    fits, fits_peak, fails, slope = 1, one, None, max(two - one, 1)
    while True:
        guess = fits + (budget - fits_peak) // slope
        if fails is not None and guess >= fails:
            guess = (fits + fails) // 2
        if guess <= fits:
            return fits, fits_peak
        peak = with_allowance(estimate([guess])[0])
        if peak <= budget:
            slope = max((peak - fits_peak) // (guess - fits), 1)
            fits, fits_peak = guess, peak
        else:
            slope = max((peak - fits_peak) // (guess - fits), 1)
            fails = guess


def fit(config: RunConfig, card: str, share: float = DEFAULT_SHARE,
        progress: Callable[[str], None] = lambda _message: None) -> CardFit:
    """The V100 overlay for `card`: per variant and phase, the largest micro-batch whose estimated peak stays
    under `share` of the card; gradient checkpointing only where, without it, a batch of 1 does not fit or the
    largest batch leaves the card under FILL_FLOOR (and it is kept only if it buys a larger batch); gradient
    accumulation when the fitted batch is below the config's, so the effective batch never shrinks.
    """
    if card not in CARDS:
        raise ValueError(f"--card {card!r}: known cards are {', '.join(CARDS)}")
    if not 0 < share < 1:
        raise ValueError(f"--share {share}: a share of the card between 0 and 1, e.g. 0.85")
    budget = int(share * CARDS[card])
    base = json_ready(config)

    def overlay_for(denoiser_checkpointing: bool, vae_checkpointing: bool) -> dict[str, Any]:
        return {"device": "cuda", "training": {"precision": "fp16"},
                "denoiser": {"gradient_checkpointing": denoiser_checkpointing},
                "vae": {"maisi": {"use_checkpointing": vae_checkpointing}}}

    def fits_with(overlay: dict[str, Any], pairs: list[tuple[str, Phase]]
                  ) -> dict[tuple[str, Phase], tuple[int, int] | None]:
        found = {}
        for variant, phase in pairs:
            resolved = validate(deep_merge(deep_merge(base, overlay), {"variant": variant}),
                                f"model fit ({variant}, {card})")
            progress(f"{card}: {variant} {phase} (checkpointing: denoiser {overlay['denoiser']['gradient_checkpointing']}"
                     f", MAISI VAE {overlay['vae']['maisi']['use_checkpointing']})")
            found[variant, phase] = _largest_fitting(
                lambda sizes, resolved=resolved, phase=phase: estimate_peak_bytes(resolved, phase, sizes), budget)
        return found

    def underfilled(found: dict[tuple[str, Phase], tuple[int, int] | None]) -> set[tuple[str, Phase]]:
        return {pair for pair, result in found.items() if result is None or result[1] < FILL_FLOOR * CARDS[card]}

    def larger(old: tuple[int, int] | None, new: tuple[int, int] | None) -> bool:
        return new is not None and (old is None or new[0] > old[0])

    def not_smaller(old: tuple[int, int] | None, new: tuple[int, int] | None) -> bool:
        return new is not None and (old is None or new[0] >= old[0])

    def pays(found: dict, retried: dict, pairs: list[tuple[str, Phase]], short: set[tuple[str, Phase]]) -> bool:
        """Checkpointing is kept when no pair's batch shrinks and an under-filled one grows (a frozen VAE runs
        without gradients: its checkpointing changes nothing there)."""
        return all(not_smaller(found[pair], retried[pair]) for pair in pairs) and any(
            larger(found[pair], retried[pair]) for pair in short & set(pairs))

    # Gradient checkpointing costs ~30 % more compute per step: off unless the card is left under-filled without
    # it. The MAISI VAE's checkpointing changes only the pretrained variant's steps that run the VAE, so it is
    # tried first, and kept only if it buys a larger batch for them.
    every = [(variant, phase) for variant in VARIANTS for phase in ("frozen", "full")]
    vae_steps = [(variant, phase) for variant, phase in every
                 if variant == "pretrained" and (phase == "full" or not config.training.latent_cache)]
    overlay = overlay_for(False, False)
    found = fits_with(overlay, every)
    short = underfilled(found)
    if short & set(vae_steps):
        retried = fits_with(overlay_for(False, True), vae_steps)
        if pays(found, retried, vae_steps, short):
            overlay = overlay_for(False, True)
            found.update(retried)
            short = underfilled(found)
    # The reformat CNN has no blocks to recompute (denoiser.gradient_checkpointing is for the UNet).
    denoiser_checkpointable = config.denoiser.architecture == "unet"
    if denoiser_checkpointable and (any(found[pair] is None for pair in short) or (short - set(vae_steps))):
        retried = fits_with(overlay_for(True, True), every)
        if pays(found, retried, every, short):
            overlay = overlay_for(True, True)
            found = retried
    missing = [f"{variant} {phase}" for (variant, phase), result in found.items() if result is None]
    if missing:
        raise ValueError(f"--card {card}: even one clip with gradient checkpointing exceeds {share:.0%} of the "
                         f"card for {', '.join(missing)}; make data.clip or the networks smaller")
    accumulation = 1
    phases = []
    for phase in ("frozen", "full"):
        settings = config.training.frozen if phase == "frozen" else config.training.full
        by_variant = {}
        for variant in VARIANTS:
            batch, peak = found[variant, phase]
            by_variant[variant] = batch
            accumulation = max(accumulation, math.ceil(settings.batch_for(variant) / batch))
            phases.append(PhaseFit(variant, phase, batch, peak, CARDS[card]))
        overlay["training"][phase] = {"batch_size_by_variant": by_variant}
    if accumulation > 1:
        overlay["training"]["grad_accum_steps"] = accumulation
    overlay["cluster"] = {"gpu_products": list(CARD_PRODUCTS[card])}
    return CardFit(card, share, overlay, phases)


def json_ready(config: RunConfig) -> dict[str, Any]:
    """The config as plain data (what a YAML file would hold)."""
    return config.model_dump(mode="json")


def format_fit_table(fits: Sequence[CardFit]) -> str:
    """The fitted batches and estimated peaks of one or more cards as a Markdown table."""
    lines = ["| card | variant | phase | batch | est. peak | of card |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for card_fit in fits:
        for row in card_fit.phases:
            lines.append(f"| {card_fit.card} | {row.variant} | {row.phase} | {row.batch_size} | "
                         f"{row.peak_bytes / 2**30:.2f} GiB | {row.share:.0%} |")
    return "\n".join(lines)


def preset_text(card_fit: CardFit, command: str) -> str:
    """The preset YAML for a card: the overlay, headed by how it was made and each batch's estimated peak."""
    gigabytes = CARDS[card_fit.card] // 10**9
    header = [
        f"# Overlay for one {gigabytes} GB V100 (fp16 autocast + GradScaler: no bf16 on Volta); use it after",
        "# main.yaml or pretrained.yaml. Generated: do not edit the batches by hand, regenerate with",
        f"#   {command}",
        "# Estimated peak per process (MemTracker under FakeTensorMode, one fp16 training step with AdamW state,",
        (f"# + {FRAGMENTATION_SHARE:.0%} fragmentation + {CONTEXT_ALLOWANCE_BYTES / 2**30:g} GiB CUDA context; "
         f"card = {gigabytes}e9 bytes, budget {card_fit.share:.0%}):"),
    ]
    for row in card_fit.phases:
        header.append(f"#   {row.variant:<10} {row.phase:<6} batch {row.batch_size:>3}: "
                      f"{row.peak_bytes / 2**30:5.2f} GiB ({row.share:.0%} of the card)")
    header.append("# Not measured on a GPU here; compare with torch.cuda.max_memory_reserved() on the first real run.")
    header.append(f"# cluster.gpu_products: only {gigabytes} GB cards (the batches are sized for them).")
    return "\n".join(header) + "\n" + yaml.safe_dump(card_fit.overlay, sort_keys=False)
