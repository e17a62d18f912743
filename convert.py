#!/usr/bin/env python3
"""Convert a Qwen checkpoint into an MLX folder: the same as `qwen-mlx convert`.

    python convert.py Qwen/Qwen3-0.6B -q --recipe mixed_4_6 -o Qwen3-0.6B-mixed
"""

import sys

from qwen_mlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
