"""Profile plates on a Ray cluster: the ``microsnoop-ray profile`` command as a Ray job.

    ray job submit --working-dir . -- python jobs/profile_plates.py PLATE... --platemap MAP --out DIR

Same arguments as ``microsnoop-ray profile``; inside a job Ray connects to the cluster
(``RAY_ADDRESS`` is set by the job submission). Resubmitting the same command after an
interruption (``ray job stop``, a lost node) does only the sites that are missing.
"""
import sys

from microsnoop_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
