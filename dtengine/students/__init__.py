"""Students: a timm backbone plus the feature regressor that predicts the teacher's levels."""

from dtengine.students.backbone import create_backbone
from dtengine.students.regressor import FeatureRegressor, PyramidPoolingModule
from dtengine.students.student import DistillationStudent, StudentConfig

__all__ = ["DistillationStudent", "FeatureRegressor", "PyramidPoolingModule", "StudentConfig", "create_backbone"]
