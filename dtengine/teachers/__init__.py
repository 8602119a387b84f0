"""Teachers: frozen models mapping images (+ noise) to (images the student sees, [multi-scale features])."""

from dtengine.levels import TeacherLevel
from dtengine.teachers.adm import ADMConfig, ADMTeacher, ADMUNet
from dtengine.teachers.build import TeacherInfo, build_teacher, describe_teacher
from dtengine.teachers.config import TEACHER_KINDS, TeacherConfig
from dtengine.teachers.diffusion import (
    BUILTIN_TEACHER,
    DiffusionTeacher,
    build_diffusion_teacher,
    load_diffusion_components,
)
from dtengine.teachers.interface import Teacher, TeacherOutput
from dtengine.teachers.noising import NoisingTeacher

__all__ = [
    "ADMConfig",
    "ADMTeacher",
    "ADMUNet",
    "BUILTIN_TEACHER",
    "DiffusionTeacher",
    "NoisingTeacher",
    "TEACHER_KINDS",
    "Teacher",
    "TeacherConfig",
    "TeacherInfo",
    "TeacherLevel",
    "TeacherOutput",
    "build_diffusion_teacher",
    "build_teacher",
    "describe_teacher",
    "load_diffusion_components",
]
