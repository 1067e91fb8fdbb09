"""nn.Module wrappers of robustdrop's functional ops."""
from robustdrop.nn.active_drop_block import ActiveDropBlock2d
from robustdrop.nn.cam_drop import CamDrop2d, cam_targets, set_cam_targets
from robustdrop.nn.drop_block import DropBlock2d
from robustdrop.nn.feature_density import FeatureDensityDropout1d, FeatureDensityDropout2d
from robustdrop.nn.random_mask import RandomMask2d

__all__ = ["ActiveDropBlock2d", "CamDrop2d", "DropBlock2d", "FeatureDensityDropout1d", "FeatureDensityDropout2d", "RandomMask2d",
           "cam_targets", "set_cam_targets"]
