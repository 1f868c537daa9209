"""Start the real ``tritonserver`` (from the nvidia-pytriton wheel) over this project's model repository."""

from triton_vlm.launcher.server import LauncherError, ServerOptions, TritonServer

__all__ = ["LauncherError", "ServerOptions", "TritonServer"]
