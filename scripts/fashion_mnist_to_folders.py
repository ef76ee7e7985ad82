"""Turn Debian's Fashion-MNIST IDX files into image folders: OUT/{train,test}/<class>/*.png.

    apt-get install dataset-fashion-mnist
    python scripts/fashion_mnist_to_folders.py data/fashion --train-per-class 500 --test-per-class 100

Without the --*-per-class options the whole set is written (60,000 + 10,000 images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embedx.demo_data import write_fashion_mnist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-per-class", type=int, default=None)
    ap.add_argument("--test-per-class", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = write_fashion_mnist(args.out, args.train_per_class, args.test_per_class, args.seed)
    print(f"wrote {counts['train']} train and {counts['test']} test images to {args.out}")


if __name__ == "__main__":
    main()
