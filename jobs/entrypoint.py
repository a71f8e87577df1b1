"""Ray job entrypoint: ``ensemble-kd run`` on a config, joining the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/entrypoint.py --config jobs/configs/cifar100-resnet32x4-ensemble.yaml \
        --set data.root=/data/cifar-100-python --out /shared/ekd

Inside ``ray job submit`` Ray sets ``RAY_ADDRESS``, and ``ensemble-kd`` joins that cluster instead
of starting a local one. ``--out`` must be an absolute folder that every node mounts at the same
path: the command proves it before any work (a relative one, which would land in the job's
temporary copy of the working dir on the head, is refused on a cluster of several nodes). Any ``ensemble-kd run`` argument works here (``--set``, ``--out``,
``--no-progress``). Other commands: ``python jobs/entrypoint.py tune --config ...``.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    from ensemble_kd.cli import main
except ModuleNotFoundError:  # not pip-installed on the cluster: import it from the checkout this file is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ensemble_kd.cli import main

COMMANDS = {"run", "tune", "distill", "embed", "select", "teachers", "compare"}

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        args = ["run", *args]  # the default: the main job
    sys.exit(main(args))
