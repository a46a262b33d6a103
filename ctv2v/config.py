"""The run configuration's schema: one pydantic model per section, every section forbids unknown keys.

Reading, layering and overriding configs lives in ctv2v.config_io.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Variant = Literal["main", "pretrained"]
VARIANTS: tuple[str, ...] = get_args(Variant)
"""The pipeline's two branches (see ctv2v.models.weights for how they relate to VAE and weights kinds)."""


class ConfigError(ValueError):
    """A configuration file, key or value is invalid; the message names the file and the dotted key."""


class _Section(BaseModel):
    # Strict types: `epochs: yes` or `--set training.checkpoint_every_steps=true` must not become 1 (bool -> int),
    # nor a number a string. YAML gives numbers, booleans and strings their own types (ctv2v.config_io).
    # No float field takes .inf or .nan: no setting means them, and a written config would hold `null` for them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------- data
class IntensityConfig(_Section):
    """The VAE's input contract: HU clipped to [hu_min, hu_max] and scaled to [0, 1] (MAISI's CT contract)."""

    hu_min: float = -1000.0
    hu_max: float = 1000.0

    @model_validator(mode="after")
    def _ordered(self) -> "IntensityConfig":
        if not self.hu_max > self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must be greater than hu_min ({self.hu_min})")
        return self


class ThickConfig(_Section):
    """How the thick series is made when a dataset has no real paired thick series.

    `factor` k keeps one thick slice per k thin slices (thick spacing = k x thin spacing). `slab_average`
    averages the thin slices inside a slab of `thickness_mm` centred on each thick position (default: the
    thick spacing, i.e. contiguous slabs); `subsample` keeps every k-th thin slice.
    """

    method: Literal["slab_average", "subsample"] = "slab_average"
    factor: int = Field(4, ge=2)
    thickness_mm: float | None = Field(None, gt=0)


class ResampleConfig(_Section):
    """A common voxel spacing for every volume, applied before thick slices are simulated.

    The thick spacing is `thick.factor` x the thin slice spacing, so volumes of different thin spacings give
    different physical gaps (the demo's 1.5 mm training CT at x4 has 6 mm gaps, its 3 mm test CTs 12 mm).
    Resampling (partial-volume box weights: exact averages when coarsening, identity at the same spacing)
    makes the gap `factor x slice_mm` everywhere. None leaves that axis at each volume's own spacing.
    """

    slice_mm: float | None = Field(None, gt=0)
    pixel_mm: float | None = Field(None, gt=0)


class SplitConfig(_Section):
    """Patient-level split fractions; the assignment is a deterministic function of patient id and seed."""

    train: float = Field(0.6, ge=0)
    val: float = Field(0.2, ge=0)
    test: float = Field(0.2, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class ClipConfig(_Section):
    """A clip: `frames` consecutive thin slices over a `height` x `width` crop, plus the matching thick slices."""

    frames: int = Field(16, ge=4)
    height: int = Field(128, ge=8)
    width: int = Field(128, ge=8)
    clips_per_volume: int = Field(8, ge=1)
    eval_overlap: float = Field(0.25, ge=0, lt=1)


class AugmentConfig(_Section):
    """How training clips are drawn from each training volume (each switchable; ablated in bench_quality).

    What transfers from one patient is the through-plane residual seen along long stretches of the slice axis
    with the slab phase known (shared/FIELD_NOTES.md, calibration): slab phases and axes turn one volume into
    3 k such views (ctv2v.data.augment).
    """

    slab_phases: bool = False
    """Thick series simulated at every one of the k offsets (thick slice j on thin slice p + j*k, p < k)."""
    axes: bool = False
    """Each axis of the volume as the slice axis in turn; needs an isotropic grid (data.resample, or the
    volume's own), which is checked."""
    flips: bool = True
    """Random flips of both in-plane axes, and a transpose of them on square crops."""
    hu_scale: float = Field(0.0, ge=0, lt=1)
    """HU jitter: every clip's HU values times a random factor in [1 - hu_scale, 1 + hu_scale] (0: off)."""
    hu_offset: float = Field(0.0, ge=0)
    """HU jitter: plus a random offset in [-hu_offset, hu_offset] HU (0: off)."""

    @property
    def makes_views(self) -> bool:
        """Whether clips come from anything but the volume's own thick series as stored."""
        return self.slab_phases or self.axes or self.hu_scale > 0 or self.hu_offset > 0


class DataConfig(_Section):
    source: str = Field("demo", min_length=1)
    """`demo` (the embedded TotalSegmentator CT volumes), a local folder, or `s3://bucket/prefix`."""
    workspace: Path = Field(Path("workspace"), strict=False)  # YAML gives a str
    """Where staged data, the preprocessing cache, the manifest and step outputs live (a PVC in the cluster)."""
    slice_spacing_tolerance: float = Field(0.01, gt=0, lt=0.5)
    """Relative tolerance on the gap between consecutive DICOM slices before a series counts as irregular."""
    max_volume_bytes: int = Field(8 * 2**30, ge=1)
    """A volume whose headers claim more voxel data than this (stored bytes + the float32 copy the readers make)
    is refused before any voxel is read: an 80-byte .nii.gz can claim 2000 x 2000 x 2000 voxels."""
    intensity: IntensityConfig = IntensityConfig()
    thick: ThickConfig = ThickConfig()
    resample: ResampleConfig = ResampleConfig()
    split: SplitConfig = SplitConfig()
    clip: ClipConfig = ClipConfig()
    augment: AugmentConfig = AugmentConfig()
    num_workers: int = Field(0, ge=0)


# ------------------------------------------------------------------------------------------------ VAE
class ScratchVAEConfig(_Section):
    """The `main` variant's VAE: 3D convolutions that downsample in-plane only ("2D + time")."""

    channels: list[int] = [64, 128, 256]
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    kl_weight: float = Field(1e-6, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "ScratchVAEConfig":
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        return self


class TileConfig(_Section):
    """Overlapping tiles for clips too large to encode at once (MONAI sliding-window inference)."""

    depth: int = Field(32, ge=4)
    height: int = Field(128, ge=4)
    width: int = Field(128, ge=4)
    overlap: float = Field(0.25, ge=0, lt=1)

    @model_validator(mode="after")
    def _aligned_to_latent_grid(self) -> "TileConfig":
        # Tiles and their stride must land on whole latent voxels (MAISI downsamples 4x), or blended latents shift.
        for name in ("depth", "height", "width"):
            size = getattr(self, name)
            stride = int(size * (1 - self.overlap))
            if size % 4 or stride % 4:
                raise ValueError(
                    f"tile {name}={size} with overlap={self.overlap} gives stride {stride}: tile size and stride "
                    "must both be multiples of 4 (MAISI's downsampling factor)"
                )
        return self


class MaisiVAEConfig(_Section):
    """The `pretrained` variant's VAE: MONAI's AutoencoderKlMaisi with MAISI's CT weights."""

    checkpoint: str = "hf://MONAI/maisi_ct_generative/models/autoencoder.pt@main"
    sha256: str | None = None
    md5: str | None = None
    weights: Literal["pretrained", "stand-in"] = "pretrained"
    """`stand-in` builds a checkpoint of MAISI's exact layout with random values (offline demos and tests)."""
    allow_partial: bool = False
    encode_mode: Literal["volume", "stack", "tiled"] = "volume"
    stack_size: int = Field(4, ge=4)
    tile: TileConfig = TileConfig()
    num_splits: int = Field(1, ge=1)
    dim_split: int = Field(1, ge=0, le=2)
    norm_float16: bool = False
    use_checkpointing: bool = False
    recon_psnr_floor_db: float = 25.0
    recon_check_clips: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _stack_multiple_of_four(self) -> "MaisiVAEConfig":
        if self.stack_size % 4:
            raise ValueError(f"stack_size must be a multiple of 4 (MAISI's depth factor), got {self.stack_size}")
        return self


class VAEConfig(_Section):
    scratch: ScratchVAEConfig = ScratchVAEConfig()
    maisi: MaisiVAEConfig = MaisiVAEConfig()
    latent_scale_clips: int = Field(8, ge=1)
    """How many training clips estimate the latent scale factor 1/std(z)."""


# ------------------------------------------------------------------------------------ denoiser, diffusion
class DenoiserConfig(_Section):
    """The denoiser on [noisy thin latent, condition latent at the thin depth, slab phase]: MONAI's 3D
    DiffusionModelUNet (`unet`), or a CNN on reformat planes (`reformat`: 2D convolutions over (slice, row) and
    (slice, column) planes, averaged; ctv2v.models.denoiser.ReformatCNN)."""

    architecture: Literal["unet", "reformat"] = "unet"
    slab_phase: bool = False
    """k one-hot channels saying where each (latent) frame sits inside its thick slab."""
    reformat_width: int = Field(48, ge=1)
    """`reformat`: feature channels of every hidden layer."""
    reformat_layers: int = Field(6, ge=2)
    """`reformat`: convolution layers (3x3, ReLU between them)."""
    channels: list[int] = [64, 128, 256]
    attention_levels: list[bool] = [False, False, True]
    num_res_blocks: int = Field(2, ge=1)
    num_head_channels: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _levels_match(self) -> "DenoiserConfig":
        if self.architecture != "unet":
            if self.gradient_checkpointing:
                raise ValueError("gradient_checkpointing recomputes the UNet's blocks; the reformat CNN has none: set "
                                 "denoiser.gradient_checkpointing: false")
            return self
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries, channels has {len(self.channels)}"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        return self


class V2VConfig(_Section):
    """How the video-to-video model uses the image-space interpolation of the thick series on the thin grid."""

    interpolation: Literal["linear", "cubic"] = "cubic"
    """The interpolation along z (ctv2v.baselines) whose latent conditions the denoiser and starts sampling."""
    consistent_interpolation: bool = False
    """Project the interpolation onto the measured thick series first (ctv2v.data.thick.project_to_thick), so
    the model starts from the best non-learned reference (e.g. cubic+dc) and learns only what that misses."""
    condition: Literal["thick", "interpolation"] = "thick"
    """What the denoiser sees beside its input: the thick clip's latent resampled to the thin depth, or the
    latent of the interpolation (same shape as the thin latent)."""
    residual_decoding: bool = False
    """Output = interpolation + decode(predicted latent) - decode(latent of the interpolation): the VAE's own
    reconstruction error cancels to first order, and a latent equal to the interpolation's returns it exactly."""


class DiffusionConfig(_Section):
    scheduler: Literal["ddpm", "rflow"] = "ddpm"
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"] = "scaled_linear_beta"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    sample_steps: int = Field(50, ge=1)
    """The model's sampling steps: validation and evaluation sample with these unless training.val_sample_steps or
    evaluation.sample_steps override them; with train_timesteps `sampled` also the timesteps training draws."""
    min_snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023), DDPM only; None weights every timestep equally."""
    source: Literal["noise", "interpolation"] = "noise"
    """Where sampling starts. `interpolation` (rflow only): a flow from the interpolation's latent to the thin
    latent, the velocity being their difference; with the UNet's zero-initialised output layer an untrained
    model returns the interpolation's latent (the reformat CNN's near-zero one: nearly)."""
    train_timesteps: Literal["uniform", "sampled"] = "uniform"
    """Which timesteps training draws. `uniform`: all of [0, T). `sampled` (rflow only): only those sampling
    visits with sample_steps; with one step that is t = T alone, so the denoiser learns exactly the one map it
    is used for (source latent -> velocity) instead of spreading its training over blends it never sees."""

    @model_validator(mode="after")
    def _rflow_predicts_velocity(self) -> "DiffusionConfig":
        if self.scheduler == "rflow" and self.prediction_type != "v_prediction":
            raise ValueError(
                "scheduler 'rflow' predicts the flow velocity (x0 - noise) only: set prediction_type: v_prediction"
            )
        if self.scheduler == "rflow" and self.min_snr_gamma is not None:
            raise ValueError("min_snr_gamma weights DDPM timesteps by SNR; it is not defined for scheduler 'rflow'")
        if self.train_timesteps == "sampled" and self.scheduler != "rflow":
            raise ValueError("train_timesteps 'sampled' draws the rectified-flow sampler's timesteps: set "
                             "scheduler: rflow")
        if self.source == "interpolation" and self.scheduler != "rflow":
            raise ValueError("source 'interpolation' is a flow from the interpolation's latent: set scheduler: rflow")
        return self


# -------------------------------------------------------------------------------------------- training
class PhaseConfig(_Section):
    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-4, gt=0)
    """Per optimizer step, whatever the global batch (micro-batch x grad_accum_steps x processes): it is not
    rescaled when GPUs or nodes are added. To keep a run comparable at a larger global batch, scale it yourself
    (square-root rule for AdamW: lr x sqrt(new global batch / old))."""
    batch_size: int = Field(1, ge=1)
    """Micro-batch per process."""
    batch_size_by_variant: dict[Variant, Annotated[int, Field(ge=1)]] = {}
    """Per-variant micro-batch that replaces batch_size for that variant: the V100 presets (`ctv2v model fit`)
    fill the card for each variant, and one config serves both branches of the DAG."""
    warmup_steps: int = Field(0, ge=0)

    def batch_for(self, variant: Variant) -> int:
        """The micro-batch per process of `variant`."""
        return self.batch_size_by_variant.get(variant, self.batch_size)


class FullPhaseConfig(PhaseConfig):
    vae_lr_multiplier: float = Field(0.1, ge=0)
    recon_weight: float = Field(1.0, ge=0)


class TrainingConfig(_Section):
    frozen: PhaseConfig = PhaseConfig()
    full: FullPhaseConfig = FullPhaseConfig(epochs=5, lr=5e-5)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum_steps: int = Field(1, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """`auto`: fp16 autocast + GradScaler on CUDA (V100 has no bf16), fp32 on CPU."""
    checkpoint_every_steps: int = Field(100, ge=1)
    latent_cache: bool = True
    """Frozen phase: encode the training clips once and train the denoiser on cached latents."""
    image_loss_weight: float = Field(0.0, ge=0)
    """Both phases: add this weight x the mean squared error between the thin clip and the image the prediction
    stands for (its x0 estimate decoded, through residual decoding when on, as sampling forms the output). The
    latent loss weighs every latent value alike, whatever the decoder makes of it; this term trains on what
    evaluation scores. Rectified flow only; needs the clips (training.latent_cache: false)."""
    val_every_epochs: int = Field(1, ge=1)
    val_clips: int = Field(4, ge=1)
    """Fixed val clips (the val views' evaluation tiles with the most tissue) whose diffusion loss is tracked."""
    val_scored_views: int = Field(0, ge=0)
    """How many val views (each val volume, and with data.augment.axes its in-plane axes as the slice axis) are
    predicted whole at every validation, as the evaluate step predicts a scan (tiles, data consistency), and scored
    (PSNR/SSIM on the synthesized slices, beside the model's start). Scores of single clips misled: on the demo's
    all-tissue val clips the model lost 1-4 dB while it gained 0.3-2.2 dB on the same views predicted whole; their
    mean PSNR picks best-model. 0 (the default): the val loss only, and it picks best-model; a whole view costs as
    much as evaluating it (main.yaml's 3 mm grid keeps it small)."""
    val_sample_steps: int | None = Field(None, ge=1)
    """Sampling steps at validation; None: diffusion.sample_steps. Fewer keep validation cheap for a model that
    samples with many (not with diffusion.train_timesteps `sampled`: RunConfig checks it)."""


class AdaptConfig(_Section):
    """Test-time self-supervision (SMORE-like): before predicting a scan, the denoiser is fine-tuned on the model's
    own thin series of the scan, an in-plane axis playing the slice axis with slab xk simulated along it (no thin
    truth used). Off when `seconds` is 0; ctv2v.evaluate.adapt."""

    seconds: float = Field(0.0, ge=0)
    """Time budget per scan (0: off). Training stops at `steps` or when the budget is spent, whichever first."""
    steps: int = Field(300, ge=1)
    lr: float = Field(1.0e-3, gt=0)
    """1e-3: an untrained cpu-quality denoiser adapted 300 steps gained +0.68 dB on example_ct_sm (3e-4: +0.25 dB
    in 90 s; its loss rose)."""
    batch_size: int = Field(4, ge=1)
    ema_decay: float | None = Field(0.99, gt=0, lt=1)
    """The adapted denoiser is an exponential moving average of its weights over the adaptation's steps, begun at
    the model's own (None: the last step's weights). Single steps on one scan moved a trained model by up to 0.24
    dB from one 50-step mark to the next; the average held example_ct within 0.01 dB of its start at every mark.
    From an untrained denoiser the average lags weights still far from converged (bench_quality's adapt only)."""


class EvaluationConfig(_Section):
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    """Metrics are computed in HU over this range (it moves PSNR by ~6 dB: it is stated in every report)."""
    sample_steps: int | None = Field(None, ge=1)
    """Sampling steps of evaluation and prediction; None: diffusion.sample_steps. The pipeline parameter
    `sample_steps` sets it per run (not with diffusion.train_timesteps `sampled`: RunConfig checks it)."""
    baselines: list[Literal["nearest", "linear", "cubic"]] = ["nearest", "linear", "cubic"]
    panel_plane: Literal["coronal", "sagittal"] = "coronal"
    write_nifti: bool = True
    max_volumes: int | None = Field(None, ge=1)
    volume_ids: list[str] | None = None
    """Only these test-split volumes (by manifest id); None: the whole test split."""
    tile_frames: Annotated[int, Field(ge=2)] | Literal["auto"] = "auto"
    """Thin slices per inference tile, a multiple of data.thick.factor (tiles start on thick slices); auto:
    data.clip.frames, the length the model was trained on. Whole-volume tiles were faster but worse: the trained
    cpu-quality model lost 0.05 / 0.00 / 0.09 dB on example_ct / example_ct_sm / an unseen head CT with them
    (bench_quality, 2026-12-07): its VAE normalises each tile (GroupNorm) as it normalised 32-slice clips."""
    tile_height: Annotated[int, Field(ge=8)] | Literal["auto"] = "auto"
    """Rows per inference tile; auto: the whole slice where the memory budget holds it, else the largest square
    tile that fits (never below data.clip's). `tile_width` alike for columns."""
    tile_width: Annotated[int, Field(ge=8)] | Literal["auto"] = "auto"
    tile_overlap: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = "auto"
    """Overlap of neighbouring tiles, a share of the tile size; auto: along z the least blending allows
    (neighbours share one thick slice), in-plane data.clip.eval_overlap."""
    tile_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Tiles sampled together in one model.sample call; auto: as many as the memory budget holds."""
    tile_memory_share: float = Field(0.5, gt=0, le=1)
    """The share of the memory available when prediction starts (free RAM on CPU, free memory on the GPU) that
    one tile batch may use; auto tile sizes and batches are chosen from a measured peak per tile voxel."""
    data_consistency: bool = False
    """Make the blended prediction agree with the measured thick series (ctv2v.data.thick.project_to_thick):
    `subsample` puts the thick slices back; `slab_average` projects so that every slab average equals its
    thick slice. The baselines are then also scored with the same projection (`<method>+dc`)."""
    adapt: AdaptConfig = AdaptConfig()


class TrackingConfig(_Section):
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI from the environment; unset there too means no tracking."""
    experiment: str = "ctv2v"
    request_timeout_s: float = Field(10.0, gt=0)
    """Per HTTP request (MLFLOW_HTTP_REQUEST_TIMEOUT, whole seconds: rounded up)."""
    max_retries: int = Field(1, ge=0, le=5)
    """MLFLOW_HTTP_REQUEST_MAX_RETRIES. A second retry already adds a 4 s backoff sleep to every failing call."""
    flush_interval_s: float = Field(30.0, gt=0)
    """Buffered metrics are sent (or written to the pending file) at most this often, and at the end."""
    retry_interval_s: float = Field(60.0, gt=0)
    """After the server failed to answer, no call is tried for this long (doubling up to 16x while it stays away)."""
    system_metrics_interval_s: float | None = Field(10.0, gt=0)
    """Sampling period of CPU/memory/disk/network/GPU metrics (`system/...`); None turns them off."""
    register_model: bool = True
    smoke_run: bool = False
    """A smoke-size config (configs/smoke.yaml sets it): its model versions are registered but never champion."""


class StorageConfig(_Section):
    s3_endpoint: str | None = None
    """A URL (http:// or https://: the scheme decides TLS); None: S3_ENDPOINT from the environment.
    Credentials come only from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""
    s3_region: str = "us-east-1"
    """S3-compatible servers such as rclone need a region for request signing."""
    timeout_s: float = Field(20.0, gt=0)
    """Connect and read timeout of each request to S3 or a checkpoint URL: an attempt on a server that accepts
    the connection but stays silent fails after this long."""
    deadline_s: float = Field(60.0, gt=0)
    """No retry of a remote operation (one S3 object, one checkpoint download) starts after this long, so a dead
    server fails it within deadline_s + timeout_s; a transfer that keeps up min_bytes_per_s is not cut off."""
    min_bytes_per_s: float = Field(16384.0, gt=0)
    """A download attempt that brings fewer bytes per second than this, averaged over each timeout_s window,
    fails (and is retried like a timeout): a server that trickles a byte every few seconds never trips the read
    timeout, and would otherwise hold the step forever."""


class NcclConfig(_Section):
    """NCCL environment of every training process (torchrun in the pod and TrainJob nodes).

    Defaults suit V100 nodes whose pods see one Ethernet interface (eth0) and no InfiniBand device: NCCL
    talks TCP over eth0 between nodes and NVLink/PCIe inside a node. With an RDMA device plugin exposing IB
    (e.g. DGX-1's EDR ports), set ib_disable: false.
    """

    socket_ifname: str | None = "eth0"
    """NCCL_SOCKET_IFNAME: e.g. `eth0`, `^lo,docker` (exclude), `=net1` (exactly); None: NCCL picks one, which
    can be an interface the other nodes cannot reach."""
    ib_disable: bool = True
    """NCCL_IB_DISABLE: no InfiniBand/RoCE transport (sockets only)."""
    timeout_s: int = Field(1800, ge=60)
    """torch.distributed process-group timeout: with TORCH_NCCL_ASYNC_ERROR_HANDLING=1 a collective waiting
    longer (a node died, a rank hangs) fails the step instead of holding every GPU until the step timeout."""
    debug: Literal["VERSION", "WARN", "INFO"] = "WARN"
    """NCCL_DEBUG."""
    extra_env: dict[Annotated[str, Field(pattern=r"^(NCCL|TORCH_NCCL)_[A-Z0-9_]+$")], str] = {}
    """Further NCCL_* / TORCH_NCCL_* variables, e.g. {NCCL_P2P_DISABLE: "1"}; they win over the keys above."""

    def environment(self) -> dict[str, str]:
        """The environment variables these settings give every training process."""
        env = {"NCCL_IB_DISABLE": "1" if self.ib_disable else "0", "NCCL_DEBUG": self.debug,
               "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
        if self.socket_ifname is not None:
            env["NCCL_SOCKET_IFNAME"] = self.socket_ifname
        return {**env, **self.extra_env}


V100_16GB_PRODUCTS: tuple[str, ...] = ("Tesla-V100-SXM2-16GB", "Tesla-V100-PCIE-16GB")
V100_32GB_PRODUCTS: tuple[str, ...] = ("Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-32GB", "Tesla-V100S-PCIE-32GB",
                                       "Tesla-V100-SXM3-32GB")
"""Values of the node label `nvidia.com/gpu.product` (NVIDIA GPU feature discovery: the driver's product name,
spaces as hyphens) of V100 cards by memory: SXM2 (DGX-1, AWS p3), PCIe, V100S PCIe, SXM3 (DGX-2)."""
IMAGE_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
KfpBackend = Literal["2.5", "2.15", "2.16", "2.17"]
"""KFP backend releases a package can be compiled for (major.minor). Kubeflow 1.10.0's KFP 2.4.1 is not one:
its backend passes the run-id placeholder through unresolved (resolved from KFP 2.5.0 on, kubeflow/pipelines
#11599), and every step needs the run id."""


class ClusterConfig(_Section):
    """How the KFP DAG is scheduled on the cluster (compile-time settings; ignored by kfp.local)."""

    cpu_image: str = "ctv2v/cpu:0.1.0"
    """Image of the CPU steps: prepare-data, fetch-checkpoint, compare and the exit handler (finish-run)."""
    trainer_image: str = "ctv2v/trainer:0.1.0"
    """Image of the GPU steps (PyTorch's CUDA 12.6 build, with V100 kernels)."""
    cpu_image_digest: str | None = Field(None, pattern=IMAGE_DIGEST_PATTERN)
    trainer_image_digest: str | None = Field(None, pattern=IMAGE_DIGEST_PATTERN)
    """`sha256:<64 hex>`: the steps run `<image without its tag>@<digest>`, so the pipeline and the image cannot
    drift apart (`ctv2v pipeline compile --images-lock` fills both from scripts/build-images.sh's lock file)."""
    image_pull_secrets: list[str] = []
    """Secrets (type kubernetes.io/dockerconfigjson) in the run's namespace for pulling from a private registry."""
    gpu_resource: str = "nvidia.com/gpu"
    gpu_products: list[str] = Field(default_factory=lambda: list(V100_32GB_PRODUCTS), min_length=1)
    """GPU steps run on nodes whose `nvidia.com/gpu.product` label is one of these (node affinity `In`)."""
    gpus_per_step: int = Field(1, ge=1, le=8)
    """GPUs for each training step, fixed when the pipeline is compiled (the steps take it from the compiled
    pipeline, not from the runtime config); more than one runs the step under `torchrun --nproc_per_node`."""
    cpu_per_gpu: int = Field(6, ge=1)
    memory_per_gpu_gib: int = Field(52, ge=1)
    shm_per_gpu_gib: int = Field(8, ge=1)
    """A GPU step requests, and is limited to, these per GPU (requests = limits: the kubelet evicts it last).
    The memory-backed /dev/shm is charged to the same memory limit. The defaults fit common V100 machines with
    room for the node's own daemons: 1 GPU / 8 vCPU / 61 GiB, 4 / 32 / 244, 8 / 64 / 488 (README)."""
    step_timeout_s: int = Field(172800, ge=60)
    train_retries: int = Field(2, ge=0)
    run_ttl_s: int | None = Field(7 * 24 * 3600, ge=60)
    """Seconds KFP keeps a finished run's pods and workflow before deleting them; None: kept. Only KFP >= 2.17
    applies it: for an older cluster.kfp_backend it is left out of the package (compile says so)."""
    kfp_backend: KfpBackend = "2.15"
    """The Kubeflow Pipelines backend the package is compiled for: each feature is compiled only where that
    backend applies it (pipeline.backend.BACKEND_FEATURES). 2.5: Kubeflow 1.10.1 and 1.10.2; 2.15: Kubeflow 1.11;
    2.16: Kubeflow 26.03; 2.17: KFP standalone. The default is the older of the current Kubeflow release (26.03)
    and the previous one (1.11), so the default package runs on both."""
    scratch_cleanup: Literal["never", "on_success", "always"] = "on_success"
    """When the exit handler deletes the run's folder <workspace_mount>/runs/<run id> (checkpoints, step folders):
    on_success keeps a failed run's checkpoints, so that retrying the run resumes from them."""
    workspace_pvc: str = "ctv2v-workspace"
    """PVC mounted in every step: prepared data, preprocessing cache and checkpoints (manifests/base)."""
    workspace_mount: str = "/workspace"
    """Where the workspace PVC is mounted; each pipeline run works under <mount>/runs/<run id>."""
    service_account: str | None = "ctv2v-pipeline"
    """The run's Kubernetes service account (manifests/base); None: the one KFP is configured with."""
    env_config_map: str = "ctv2v-env"
    """ConfigMap with MLFLOW_TRACKING_URI and S3_ENDPOINT (ENV_CONFIG_MAP_KEYS)."""
    s3_secret: str = "ctv2v-s3"
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the object store."""
    mlflow_secret: str | None = None
    """Optional Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    ENV_CONFIG_MAP_KEYS: ClassVar[tuple[str, ...]] = (
        "MLFLOW_TRACKING_URI", "S3_ENDPOINT", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")
    """Keys of env_config_map every step pod and every node of a multi-node step gets as environment variables."""
    S3_SECRET_KEYS: ClassVar[tuple[str, ...]] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    MLFLOW_SECRET_KEYS: ClassVar[tuple[str, ...]] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    hf_secret: str | None = None
    """Optional Secret with HF_TOKEN for fetching from Hugging Face."""
    pod_label: str = "ctv2v-pipeline"
    """Value of `app.kubernetes.io/part-of` on every step pod (the NetworkPolicies select on it)."""
    nodes: int = Field(1, ge=1)
    """Nodes per training step. 1: torchrun in the step's pod. More: the step creates a Kubeflow Trainer v2
    TrainJob of `nodes` x `gpus_per_step` processes (ctv2v.remote.trainjob) and waits for it."""
    trainer_runtime: str = Field("torch-distributed", min_length=1)
    """The ClusterTrainingRuntime a multi-node TrainJob references (Kubeflow Trainer's PyTorch runtime)."""
    trainjob_poll_s: float = Field(30.0, gt=0)
    """How long one watch request on the TrainJob stays open before the step asks again."""
    nccl: NcclConfig = NcclConfig()

    @model_validator(mode="after")
    def _shm_inside_memory(self) -> "ClusterConfig":
        if not self.shm_per_gpu_gib * 2 <= self.memory_per_gpu_gib:
            raise ValueError(f"shm_per_gpu_gib ({self.shm_per_gpu_gib}) counts against the memory limit: keep it at "
                             f"most half of memory_per_gpu_gib ({self.memory_per_gpu_gib})")
        return self

    def step_image(self, kind: Literal["cpu", "trainer"]) -> str:
        """The image of a `cpu` or `trainer` step: `<image>` or, with a digest configured, `<repository>@<digest>`."""
        image, digest = {"cpu": (self.cpu_image, self.cpu_image_digest),
                         "trainer": (self.trainer_image, self.trainer_image_digest)}[kind]
        if digest is None:
            return image
        name, _, tag = image.rpartition(":")
        # A colon after the last slash separates the tag; one before it is a registry's port (registry:5000/x).
        repository = name if name and "/" not in tag else image
        return f"{repository}@{digest}"

    def step_secrets(self) -> dict[str, tuple[str, ...]]:
        """Secret name -> its keys that every step pod and node gets as environment variables of the same names."""
        secrets = {self.s3_secret: self.S3_SECRET_KEYS}
        if self.mlflow_secret:
            secrets[self.mlflow_secret] = self.MLFLOW_SECRET_KEYS
        return secrets

    def gpu_step_resources(self, gpus: int) -> tuple[str, str, str]:
        """(CPU, memory, /dev/shm size) of a step with `gpus` GPUs, as Kubernetes quantities; CPU and memory are
        both its request and its limit, and the memory includes /dev/shm."""
        return (str(self.cpu_per_gpu * gpus), f"{self.memory_per_gpu_gib * gpus}Gi", f"{self.shm_per_gpu_gib * gpus}Gi")

    @property
    def cpu_request(self) -> str:
        """CPU request (= limit) of a training step (gpus_per_step GPUs)."""
        return self.gpu_step_resources(self.gpus_per_step)[0]

    @property
    def memory_request(self) -> str:
        """Memory request (= limit) of a training step, /dev/shm included."""
        return self.gpu_step_resources(self.gpus_per_step)[1]

    @property
    def memory_limit(self) -> str:
        """Memory limit of a training step: its request (Guaranteed QoS)."""
        return self.memory_request

    @property
    def shm_size(self) -> str:
        """Size of a training step's memory-backed /dev/shm."""
        return self.gpu_step_resources(self.gpus_per_step)[2]


class RunConfig(_Section):
    """The whole run. `variant` picks the VAE: `main` trains one from scratch, `pretrained` loads MAISI's."""

    variant: Variant = "main"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    vae: VAEConfig = VAEConfig()
    denoiser: DenoiserConfig = DenoiserConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    v2v: V2VConfig = V2VConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _latent_cache_without_interpolation(self) -> "RunConfig":
        # The cache holds whole-volume latents of the thin and thick series; the interpolation's latent is encoded
        # per clip, as sampling encodes it (one encoding path for training and sampling).
        v2v = self.v2v
        uses = v2v.condition == "interpolation" or self.diffusion.source == "interpolation" or v2v.residual_decoding
        if uses and self.training.latent_cache:
            raise ValueError("training.latent_cache caches thin and thick latents only; a model that uses the "
                             "interpolation (v2v.condition, diffusion.source, v2v.residual_decoding) needs "
                             "training.latent_cache: false")
        if self.training.image_loss_weight > 0:
            if self.diffusion.scheduler != "rflow":
                raise ValueError("training.image_loss_weight decodes the rectified flow's x0 estimate: set "
                                 "diffusion.scheduler: rflow")
            if self.training.latent_cache:
                raise ValueError("training.image_loss_weight compares decoded clips with the thin clips: set "
                                 "training.latent_cache: false")
        if self.data.augment.makes_views and self.training.latent_cache:
            raise ValueError("data.augment (slab_phases, axes, HU jitter) draws clips the latent cache does not hold: "
                             "set training.latent_cache: false")
        return self

    @model_validator(mode="after")
    def _sampling_steps_trained_for(self) -> "RunConfig":
        # `sampled` trains the denoiser only at the timesteps diffusion.sample_steps visits: other step counts
        # would query it at timesteps it never saw.
        if self.diffusion.train_timesteps != "sampled":
            return self
        trained = self.diffusion.sample_steps
        for key, steps in (("training.val_sample_steps", self.training.val_sample_steps),
                           ("evaluation.sample_steps", self.evaluation.sample_steps)):
            if steps is not None and steps != trained:
                raise ValueError(f"{key}={steps} differs from diffusion.sample_steps={trained}: with "
                                 f"diffusion.train_timesteps 'sampled' the model learns only the timesteps of "
                                 f"{trained} sampling step(s); remove {key} (null) or set it to {trained}")
        return self

    @property
    def validation_sample_steps(self) -> int:
        """Sampling steps at validation: training.val_sample_steps, else diffusion.sample_steps."""
        steps = self.training.val_sample_steps
        return steps if steps is not None else self.diffusion.sample_steps

    @property
    def evaluation_sample_steps(self) -> int:
        """Sampling steps of evaluation and prediction: evaluation.sample_steps, else diffusion.sample_steps."""
        steps = self.evaluation.sample_steps
        return steps if steps is not None else self.diffusion.sample_steps
