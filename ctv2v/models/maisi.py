"""NVIDIA MAISI's CT VAE (MONAI's AutoencoderKlMaisi): its architecture, how to build it, and how to load a checkpoint.

Loading never guesses: the architecture is inferred from the checkpoint's tensor names and shapes, the network
is built from it, and every tensor must match (strict load). The report names each missing, unexpected or
mis-shaped tensor; a partial load happens only when explicitly allowed and is then labelled PARTIAL.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from ctv2v.files import UnsafeOrCorruptFileError, atomic_torch_save, load_torch_file

log = logging.getLogger(__name__)

MAISI_CT_ARCH: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_convtranspose": False,
}
"""MAISI's CT configuration: 130 state-dict keys, 20,944,897 parameters (FIELD_NOTES, monai 1.6.1)."""

MAISI_DOWNSAMPLE = 4
"""AutoencoderKlMaisi halves every spatial axis twice."""


def build_autoencoder(
    arch: dict[str, Any],
    *,
    num_splits: int = 1,
    dim_split: int = 1,
    norm_float16: bool = False,
    use_checkpointing: bool = False,
) -> AutoencoderKlMaisi:
    """AutoencoderKlMaisi from architecture arguments plus runtime memory options (which do not change weights)."""
    return AutoencoderKlMaisi(
        **arch,
        num_splits=num_splits,
        dim_split=dim_split,
        norm_float16=norm_float16,
        use_checkpointing=use_checkpointing,
        use_flash_attention=False,
    )


# ------------------------------------------------------------------------------------ checkpoint loading
class CheckpointFormatError(ValueError):
    """A checkpoint file cannot be read as a plain tensor state dict; the message names the file."""


class ArchitectureMismatchError(ValueError):
    """A state dict is not (or not entirely) an AutoencoderKlMaisi's; `report` holds the key-by-key match."""

    def __init__(self, message: str, report: "MatchReport | None" = None):
        super().__init__(message)
        self.report = report


CONTAINER_KEYS = ("state_dict", "model")
"""Entries that training scripts wrap a state dict in, unwrapped in this order."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel / DataParallel and by torch.compile."""

_RESBLOCK_CONV_LEGACY = re.compile(r"^(encoder|decoder)\.blocks\.\d+\.conv[12]\.conv\.(weight|bias)$")
_RESBLOCK_CONV_CURRENT = re.compile(r"^(encoder|decoder)\.blocks\.\d+\.conv[12]\.conv\.conv\.(weight|bias)$")
_ATTENTION_KEY = re.compile(r"\.(to_q|to_k|to_v|qkv|proj_attn|out_proj)\.(weight|bias)$")

ARCH_NOT_IN_WEIGHTS = {
    "norm_eps": "GroupNorm's epsilon is not stored in a state dict: MAISI's 1e-6",
    "use_convtranspose": "a transposed 3x3x3 upsampling convolution has the same tensor names and shapes as the "
                         "interpolate-then-convolve one: MAISI's False",
    "norm_num_groups": "GroupNorm weights do not record the group count: MAISI's 32 where it divides every "
                       "channel count, else the largest divisor of them all below 32",
}
"""Constructor arguments that tensor names and shapes cannot reveal, and what infer_arch assumes for them."""


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The normalized state dict of a checkpoint file and notes on every rewrite made to get it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        obj = load_torch_file(path, "VAE checkpoint")
    except UnsafeOrCorruptFileError as exc:
        raise CheckpointFormatError(str(exc)) from None
    notes: list[str] = []
    state = _unwrap(obj, path, notes)
    state = _map_legacy_keys(state, path, notes)
    return state, notes


def _unwrap(obj: Any, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """Unwrap `{"state_dict": ...}` / `{"model": ...}` containers and DDP / torch.compile key prefixes."""
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            odd = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
            raise CheckpointFormatError(
                f"{path}: not a state dict: entries {_preview(sorted(map(str, odd)))} are not tensors "
                f"({_preview([f'{k}: {t}' for k, t in odd.items()])}) and there is no "
                f"{' / '.join(repr(k) for k in CONTAINER_KEYS)} entry holding one"
            )
        notes.append(f"unwrapped the state dict from the checkpoint's {key!r} entry")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise CheckpointFormatError(f"{path}: the state dict is empty")
    for prefix in WRAPPER_PREFIXES:
        if all(str(k).startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
            notes.append(f"stripped the {prefix!r} prefix from every key")
    return dict(obj)


def _map_legacy_keys(state: dict[str, torch.Tensor], path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """Rename pre-MONAI-1.4 keys (`...conv.weight`) to AutoencoderKlMaisi's (`...conv.conv.weight`).

    Before MONAI 1.4 every convolution in MAISI's encoder and decoder blocks was a bare monai Convolution
    (`blocks.0.conv.weight`, `blocks.1.conv1.conv.weight`, a down/upsampler's `blocks.3.conv.conv.weight`);
    1.4 wrapped each one in MaisiConvolution, which holds the Convolution as `.conv`, so each such key gains
    one `.conv`. GroupNorms and the quant convolutions outside the blocks kept their names. A checkpoint is
    taken as legacy when its residual-block convolutions all have the short form; with attention blocks
    present it is ambiguous (their residual blocks kept the short form in 1.4 too) and nothing is renamed.
    """
    legacy = [k for k in state if _RESBLOCK_CONV_LEGACY.match(k)]
    if not legacy or any(_RESBLOCK_CONV_CURRENT.match(k) for k in state):
        return state
    attention = [k for k in state if _ATTENTION_KEY.search(k)]
    if attention:
        raise ArchitectureMismatchError(
            f"{path}: not an AutoencoderKlMaisi state dict: its keys have the layout of MONAI's generic "
            f"AutoencoderKL or a pre-1.4 MAISI checkpoint (e.g. {legacy[0]!r} where AutoencoderKlMaisi has "
            f"'...conv.conv.weight') and it has attention blocks (e.g. {attention[0]!r}), so which keys to "
            "rename is ambiguous; nothing was loaded"
        )
    renamed = {}
    count = 0
    for key, value in state.items():
        if key.startswith(("encoder.blocks.", "decoder.blocks.")) and key.endswith((".conv.weight", ".conv.bias")):
            head, param = key.rsplit(".", 1)
            key = f"{head}.conv.{param}"
            count += 1
        renamed[key] = value
    notes.append(f"renamed {count} pre-MONAI-1.4 keys ('...conv.weight' -> '...conv.conv.weight'); MONAI's "
                 "generic AutoencoderKL has the same names and shapes, so only the reconstruction check can "
                 "tell the two apart")
    log.warning("%s: %s", path, notes[-1])
    return renamed


# ----------------------------------------------------------------------------------- architecture inference
def _blocks(state: dict[str, torch.Tensor], part: str) -> list[dict[str, torch.Tensor]]:
    """The tensors of `part`.blocks.0, 1, ... keyed by their name inside the block."""
    pattern = re.compile(rf"^{part}\.blocks\.(\d+)\.(.+)$")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if sorted(found) != list(range(len(found))):
        raise ArchitectureMismatchError(f"{part}.blocks indices are not 0..n-1: {sorted(found)}")
    return [found[i] for i in range(len(found))]


def _kind(block: dict[str, torch.Tensor]) -> str:
    """What an encoder/decoder block is, from its weight names (a missing bias is left for the match report)."""
    names = set(block)

    def only(module: str) -> bool:
        return f"{module}.weight" in names and names <= {f"{module}.weight", f"{module}.bias"}

    if only("conv.conv"):
        return "conv"
    if only("conv.conv.conv"):
        return "resample"
    if "conv1.conv.conv.weight" in names:
        return "res"
    if "conv1.conv.weight" in names:
        return "nonlocal_res"
    if any(name.startswith("attn.") for name in names):
        return "attention"
    if "weight" in names and names <= {"weight", "bias"} and block["weight"].ndim == 1:
        return "norm"
    return "unknown"


def _not_maisi(part: str, index: int, block: dict[str, torch.Tensor], expected: str) -> ArchitectureMismatchError:
    shapes = {name: list(t.shape) for name, t in block.items()}
    return ArchitectureMismatchError(
        f"not an AutoencoderKlMaisi state dict: {part}.blocks.{index} should be {expected} but holds {shapes}"
    )


def _parse_encoder(blocks: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Channels, residual blocks and attention per level, read from the encoder's block sequence."""
    kinds = [_kind(b) for b in blocks]
    if not kinds or kinds[0] != "conv":
        raise _not_maisi("encoder", 0, blocks[0] if blocks else {}, "the input convolution")
    in_channels = blocks[0]["conv.conv.weight"].shape[1]
    levels: list[dict[str, Any]] = [{"channels": None, "res": 0, "attention": []}]
    i = 1
    while i < len(kinds) and kinds[i] in ("res", "attention", "resample"):
        level = levels[-1]
        if kinds[i] == "res":
            level["channels"] = blocks[i]["conv1.conv.conv.weight"].shape[0]
            level["res"] += 1
            attended = i + 1 < len(kinds) and kinds[i + 1] == "attention"
            level["attention"].append(attended)
            i += 2 if attended else 1
        elif kinds[i] == "resample":
            if level["res"] == 0:
                raise _not_maisi("encoder", i, blocks[i], "a residual block (a level has at least one)")
            levels.append({"channels": None, "res": 0, "attention": []})
            i += 1
        else:
            raise _not_maisi("encoder", i, blocks[i], "a residual block or downsampler before an attention block")
    if levels[-1]["res"] == 0:
        raise _not_maisi("encoder", i, blocks[i] if i < len(blocks) else {}, "a residual block of the last level")
    nonlocal_attn = kinds[i:i + 3] == ["nonlocal_res", "attention", "nonlocal_res"]
    if nonlocal_attn:
        i += 3
    if kinds[i:] != ["norm", "conv"]:
        raise _not_maisi("encoder", i, blocks[i] if i < len(blocks) else {}, "the output GroupNorm and convolution")
    for n, level in enumerate(levels):
        if any(level["attention"]) and not all(level["attention"]):
            raise ArchitectureMismatchError(
                f"not an AutoencoderKlMaisi state dict: encoder level {n} has attention after some residual blocks "
                f"but not others ({level['attention']})"
            )
    return {
        "in_channels": int(in_channels),
        "num_channels": [int(level["channels"]) for level in levels],
        "num_res_blocks": [level["res"] for level in levels],
        "attention_levels": [bool(level["attention"][0]) for level in levels],
        "with_encoder_nonlocal_attn": nonlocal_attn,
        "encoder_out_channels": int(blocks[-1]["conv.conv.weight"].shape[0]),
    }


def _norm_num_groups(channels: list[int]) -> int:
    """MAISI's 32 when it divides every channel count, else the largest common divisor of them below 32."""
    common = math.gcd(*channels)
    return max(g for g in range(1, min(32, common) + 1) if common % g == 0)


def infer_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderKlMaisi constructor arguments read from a state dict's tensor names and shapes.

    Read from the weights: in/out/latent channels, channels and residual blocks per level, attention levels,
    encoder/decoder non-local attention (and, with attention, include_fc / use_combined_linear). Not readable
    and assumed as in ARCH_NOT_IN_WEIGHTS: norm_num_groups, norm_eps, use_convtranspose.
    """
    required = ["encoder.blocks.0.conv.conv.weight", "quant_conv_mu.conv.weight", "post_quant_conv.conv.weight",
                "decoder.blocks.0.conv.conv.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ArchitectureMismatchError(
            f"not an AutoencoderKlMaisi state dict: no {_preview(missing)}; its {len(state)} keys begin "
            f"{_preview(list(state), 5)}"
        )
    encoder = _parse_encoder(_blocks(state, "encoder"))
    decoder = _blocks(state, "decoder")
    latent_channels = int(state["quant_conv_mu.conv.weight"].shape[0])
    if encoder["encoder_out_channels"] != latent_channels:
        raise ArchitectureMismatchError(
            f"not an AutoencoderKlMaisi state dict: the encoder ends in {encoder['encoder_out_channels']} channels "
            f"but quant_conv_mu has shape {list(state['quant_conv_mu.conv.weight'].shape)}"
        )
    if _kind(decoder[-1]) != "conv":
        raise _not_maisi("decoder", len(decoder) - 1, decoder[-1], "the output convolution")
    arch: dict[str, Any] = {
        "spatial_dims": state["encoder.blocks.0.conv.conv.weight"].ndim - 2,
        "in_channels": encoder["in_channels"],
        "out_channels": int(decoder[-1]["conv.conv.weight"].shape[0]),
        "latent_channels": latent_channels,
        "num_channels": encoder["num_channels"],
        "num_res_blocks": encoder["num_res_blocks"],
        "norm_num_groups": _norm_num_groups(encoder["num_channels"]),
        "norm_eps": MAISI_CT_ARCH["norm_eps"],
        "attention_levels": encoder["attention_levels"],
        "with_encoder_nonlocal_attn": encoder["with_encoder_nonlocal_attn"],
        "with_decoder_nonlocal_attn": len(decoder) > 1 and _kind(decoder[1]) == "nonlocal_res",
        "use_convtranspose": MAISI_CT_ARCH["use_convtranspose"],
    }
    attention_keys = [k for k in state if _ATTENTION_KEY.search(k)]
    if attention_keys:
        arch["include_fc"] = any(".attn.out_proj." in k for k in attention_keys)
        arch["use_combined_linear"] = any(".attn.qkv." in k for k in attention_keys)
    return arch


# ------------------------------------------------------------------------------------------ match report
@dataclass
class MatchReport:
    """How a checkpoint's tensors matched an AutoencoderKlMaisi, key by key."""

    total: int
    """Tensors the network has."""
    loaded: int
    """Network tensors the checkpoint provides with the right shape."""
    missing: list[str]
    unexpected: list[str]
    shape_mismatched: dict[str, dict[str, list[int]]]
    """Name -> {"checkpoint": shape, "model": shape}."""
    checkpoint: str = ""
    arch: dict[str, Any] = field(default_factory=dict)
    assumed: dict[str, str] = field(default_factory=dict)
    """Arguments the weights cannot reveal -> what was assumed (ARCH_NOT_IN_WEIGHTS)."""
    key_notes: list[str] = field(default_factory=list)
    """Rewrites made to the checkpoint's keys before matching (unwrapping, prefixes, legacy names)."""
    partial: bool = False
    """True when an incomplete match was loaded anyway (vae.maisi.allow_partial)."""

    @property
    def complete(self) -> bool:
        return self.loaded == self.total and not self.unexpected and not self.shape_mismatched

    @property
    def status(self) -> str:
        return "complete" if self.complete else ("PARTIAL" if self.partial else "failed")

    @property
    def loaded_fraction(self) -> float:
        """Share of the network's tensors loaded from the checkpoint (1.0 for a strict load)."""
        return self.loaded / self.total

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, plus `status` for readers of the file (from_dict recomputes it)."""
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MatchReport":
        """Inverse of to_dict; an unknown key or a `status` that contradicts the counts is an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"status"})
        if unknown:
            raise ValueError(f"match report: unknown key(s) {unknown}; expected {sorted(names)} and 'status'")
        report = cls(**{name: data[name] for name in names if name in data})
        if "status" in data and data["status"] != report.status:
            raise ValueError(f"match report: status {data['status']!r} contradicts its counts "
                             f"({report.loaded}/{report.total} loaded, i.e. {report.status!r})")
        return report

    def summary(self) -> str:
        """Human-readable report: status, counts, then every problem key by name."""
        lines = [
            f"MAISI VAE checkpoint match: {self.status} - "
            f"{self.loaded}/{self.total} tensors loaded ({self.checkpoint or 'state dict'})",
            f"  missing from checkpoint: {len(self.missing)}; unexpected in checkpoint: {len(self.unexpected)}; "
            f"shape mismatches: {len(self.shape_mismatched)}",
        ]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  shape mismatch: {k}: checkpoint {v['checkpoint']} vs network {v['model']}"
                  for k, v in self.shape_mismatched.items()]
        lines += [f"  key rewrite: {note}" for note in self.key_notes]
        if self.arch:
            lines.append(f"  architecture: {json.dumps(self.arch)}")
        lines += [f"  assumed {name}: {why}" for name, why in self.assumed.items()]
        if self.partial:
            lines = [f"PARTIAL: {line}" for line in lines]
        return "\n".join(lines)


def match_report(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> MatchReport:
    """Compare a state dict with a network's: loaded / total, missing, unexpected and shape-mismatched keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = {
        k: {"checkpoint": list(state[k].shape), "model": list(v.shape)}
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    }
    loaded = len(expected) - len(missing) - len(mismatched)
    return MatchReport(total=len(expected), loaded=loaded, missing=missing, unexpected=unexpected,
                       shape_mismatched=mismatched)


def load_maisi_checkpoint(
    path: Path,
    *,
    allow_partial: bool = False,
    num_splits: int = 1,
    dim_split: int = 1,
    norm_float16: bool = False,
    use_checkpointing: bool = False,
) -> tuple[AutoencoderKlMaisi, MatchReport]:
    """Read a checkpoint, infer its architecture, build AutoencoderKlMaisi and load it with strict=True.

    Anything short of every tensor matching raises ArchitectureMismatchError carrying the report, unless
    `allow_partial`: then the matching tensors are loaded, the rest stay random and the report says PARTIAL.
    """
    state, notes = _read_checkpoint(path)
    try:
        arch = infer_arch(state)
    except ArchitectureMismatchError as exc:
        raise ArchitectureMismatchError(f"{path}: {exc}", exc.report) from None  # infer_arch sees no file name
    model = build_autoencoder(arch, num_splits=num_splits, dim_split=dim_split, norm_float16=norm_float16,
                              use_checkpointing=use_checkpointing)
    report = match_report(model, state)
    report.checkpoint = str(path)
    report.arch = arch
    report.assumed = dict(ARCH_NOT_IN_WEIGHTS)
    report.key_notes = notes
    if report.complete:
        model.load_state_dict(state, strict=True)
        log.info("%s: %d/%d tensors loaded strictly", path, report.loaded, report.total)
        return model, report
    if not allow_partial:
        raise ArchitectureMismatchError(
            f"{path}: refusing a partial load (set vae.maisi.allow_partial: true to override)\n{report.summary()}",
            report,
        )
    report.partial = True
    matched = {k: v for k, v in state.items()
               if k not in report.unexpected and k not in report.shape_mismatched}
    model.load_state_dict(matched, strict=False)
    log.warning("PARTIAL load of %s: %d/%d tensors; the rest are RANDOM\n%s", path, report.loaded, report.total,
                report.summary())
    return model, report


def make_stand_in_checkpoint(path: Path, seed: int) -> Path:
    """A STAND-IN checkpoint: MAISI's exact CT layout with random values (offline runs; never a pretrained result)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_autoencoder(MAISI_CT_ARCH)
    atomic_torch_save(model.state_dict(), Path(path))
    log.warning("wrote a STAND-IN MAISI checkpoint (random weights, seed %d, MAISI's CT layout) to %s", seed, path)
    return Path(path)


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(map(str, keys[:limit]))
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
