"""softprep: soft-label pyramids for semantic segmentation, in Zarr stores."""

__version__ = "0.1.0"
