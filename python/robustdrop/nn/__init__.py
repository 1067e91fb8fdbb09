"""nn.Module wrappers of robustdrop's functional ops."""
from robustdrop.nn.drop_block import DropBlock2d

__all__ = ["DropBlock2d"]
