"""softtrain: single-GPU segmentation training on softprep soft-label stores."""
