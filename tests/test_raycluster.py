"""A command's own local Ray leaves nothing behind in /tmp when it succeeds, and keeps its logs
(and says where) when it fails."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import sys
import ray
from ensemble_kd.core.config import RayConfig
from ensemble_kd.core.raycluster import ray_session
with ray_session(RayConfig(num_cpus=1)) as started:
    assert started and ray.get(ray.put(7)) == 7
    if sys.argv[1] == "fail":
        raise SystemExit(3)
"""


def _run(parent, mode):
    parent.mkdir()
    env = {**os.environ, "EKD_RAY_TMPDIR": str(parent), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("EKD_KEEP_RAY_LOGS", None)
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=180)


def test_local_ray_temp_dir_is_removed_on_success_and_kept_on_failure():
    root = Path(tempfile.mkdtemp(prefix="ekd-rc-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    try:
        ok = _run(root / "ok", "ok")
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert list((root / "ok").iterdir()) == []

        bad = _run(root / "bad", "fail")
        assert bad.returncode == 3, bad.stderr[-2000:]
        kept = list((root / "bad").iterdir())
        assert len(kept) == 1 and kept[0].name.startswith("ekd-ray-")
        assert f"Ray's logs of this run: {kept[0]}/session_latest/logs" in bad.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
