"""fMRI datasets: the common in-memory form, preprocessing, and readers of real formats."""

from mindvis.data.dataset import FMRIDataset

__all__ = ["FMRIDataset"]
