"""Sandboxed execution of policy-written Python programs."""

from .sandbox import DEFAULT_PRELOAD, ExecutionResult, PythonExecutor

__all__ = ["DEFAULT_PRELOAD", "ExecutionResult", "PythonExecutor"]
