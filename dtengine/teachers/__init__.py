"""Teachers: images -> (images the student sees, [multi-scale features])."""

from dtengine.teachers.base import TeacherLevel, TeacherOutput
from dtengine.teachers.diffusion import (
    BUILTIN_TEACHER,
    DiffusionTeacher,
    TeacherConfig,
    build_diffusion_teacher,
    load_diffusion_components,
)

__all__ = [
    "BUILTIN_TEACHER",
    "DiffusionTeacher",
    "TeacherConfig",
    "TeacherLevel",
    "TeacherOutput",
    "build_diffusion_teacher",
    "load_diffusion_components",
]
