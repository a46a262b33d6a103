"""CT data: readers (NIfTI, DICOM series), the demo set, manifests and splits, the preprocessing cache, clips."""

from ctv2v.data.readers import Volume, VolumeError, read_volume

__all__ = ["Volume", "VolumeError", "read_volume"]
