"""handpose: FreiHAND -> WebDataset shards -> DDP UNet -> bulk predict, for 21-joint 2D hand keypoints."""

__version__ = "0.1.0"
