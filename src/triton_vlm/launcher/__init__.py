"""Start the real ``tritonserver`` (from the nvidia-pytriton wheel) over this project's model repository."""

from triton_vlm.launcher.distribution import LauncherError
from triton_vlm.launcher.server import ServerOptions, TritonServer

__all__ = ["LauncherError", "ServerOptions", "TritonServer"]
