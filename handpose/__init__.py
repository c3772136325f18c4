"""handpose: labelled photos -> WebDataset shards -> DDP training -> bulk predict, for 21-joint 2D
hand keypoints."""

__version__ = "0.1.0"
