"""fMRI datasets: the common in-memory form, preprocessing, readers of real formats, and the simulator."""

from mindvis.data.dataset import FMRIDataset

__all__ = ["FMRIDataset"]
