"""``python -m triton_vlm.openai``: the same as ``triton-vlm openai``."""

import sys

from triton_vlm.openai.cli import main

if __name__ == "__main__":
    sys.exit(main())
