"""nn.Module wrappers of robustdrop's functional ops."""
from robustdrop.nn.cam_drop import CamDrop2d, cam_targets, set_cam_targets
from robustdrop.nn.drop_block import DropBlock2d
from robustdrop.nn.feature_density import FeatureDensityDropout1d, FeatureDensityDropout2d

__all__ = ["CamDrop2d", "DropBlock2d", "FeatureDensityDropout1d", "FeatureDensityDropout2d", "cam_targets",
           "set_cam_targets"]
