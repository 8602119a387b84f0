"""Teachers: frozen models mapping images (+ noise) to (images the student sees, [multi-scale features])."""

from dtengine.levels import TeacherLevel
from dtengine.teachers.diffusion import (
    BUILTIN_TEACHER,
    DiffusionTeacher,
    TeacherConfig,
    build_diffusion_teacher,
    load_diffusion_components,
)
from dtengine.teachers.interface import Teacher, TeacherOutput

__all__ = [
    "BUILTIN_TEACHER",
    "DiffusionTeacher",
    "Teacher",
    "TeacherConfig",
    "TeacherLevel",
    "TeacherOutput",
    "build_diffusion_teacher",
    "load_diffusion_components",
]
