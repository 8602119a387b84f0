"""Students: a timm backbone plus the feature regressor that predicts the teacher's levels (and a logit head)."""

from dtengine.students.backbone import InputNormalization, create_backbone
from dtengine.students.logit_head import LogitHead
from dtengine.students.regressor import FeatureRegressor, PyramidPoolingModule
from dtengine.students.student import DistillationStudent, StudentConfig, StudentOutput

__all__ = [
    "DistillationStudent",
    "FeatureRegressor",
    "InputNormalization",
    "LogitHead",
    "PyramidPoolingModule",
    "StudentConfig",
    "StudentOutput",
    "create_backbone",
]
