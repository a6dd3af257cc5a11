"""Masked-image pretraining as a Ray job (Ray Train ``TorchTrainer``).

    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain_cpu.yaml --workers 2
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain_gpu.yaml --gpu --workers 4

Same arguments as ``microsnoop-ray train``; ``--ray`` is implied. Resubmitting with the same
``--name`` and ``--storage-path`` resumes from the last per-epoch checkpoint.
"""
import sys

from microsnoop_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--ray", *sys.argv[1:]]))
