"""Wrappers of the `Distiller` step that loops apply where they build it: compilation (and, later, distribution)."""

from dtengine.parallel.compile import CompileConfig, apply_compile, compile_enabled

__all__ = ["CompileConfig", "apply_compile", "compile_enabled"]
