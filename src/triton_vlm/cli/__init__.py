"""The ``triton-vlm`` command line."""
