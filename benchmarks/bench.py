#!/usr/bin/env python3
"""The benchmark suite: the same harness as `qwen-mlx bench`.

    python benchmarks/bench.py --shape qwen3-0.6b-shape --layers 4 --contexts 128,1024
    python benchmarks/bench.py --shape qwen3-30b-a3b-shape-small --layers 2 --contexts 128,512
    python benchmarks/bench.py ./Qwen3-0.6B-4bit --contexts 128,1024,4096
"""

import sys

from qwen_mlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
