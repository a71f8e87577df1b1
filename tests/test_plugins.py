"""Plugins (docs/plugins.md): a module outside the package, named under `plugins:`, registers a
dataset, an encoder and a loss that a run uses in the driver and in its Ray workers.

The plugin module and its config are read from docs/plugins.md itself, so the documented example
is the one that runs here. Runs that need the plugin on their path are subprocesses with
PYTHONPATH=tmp_path: importing it into the test process would leave its names in this process's
registries for every later test."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from ensemble_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
PIDS_VAR = "EKD_TEST_PLUGIN_PIDS"
# appended to the documented module: each process that imports it writes its pid to a file
PROBE = f'''

import os as _os
if _os.environ.get("{PIDS_VAR}"):  # the test's probe: which processes imported this module
    with open(_os.environ["{PIDS_VAR}"], "a") as _f:
        _f.write(f"{{_os.getpid()}}\\n")
'''


def doc_block(lang: str) -> str:
    """The one ``lang`` code block of docs/plugins.md (one only, so a second one cannot go untested)."""
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, f"docs/plugins.md should hold one {lang} block, found {len(blocks)}"
    return blocks[0]


def write_plugin(folder: Path) -> Path:
    """docs/plugins.md's my_plugins.py (with the pid probe) in ``folder``, outside the package."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_plugins.py").write_text(doc_block("python") + PROBE)
    return folder


def doc_config(**over) -> dict:
    """docs/plugins.md's config, with the top-level sections in ``over`` merged in."""
    cfg = yaml.safe_load(doc_block("yaml"))
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def env_with(path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")])), **extra}
    env.pop("RAY_ADDRESS", None)  # the command starts its own local Ray
    return env


def test_run_uses_plugin_dataset_encoder_and_loss_in_ray_workers(tmp_path):
    """`ensemble-kd run` on the documented config (tiny): the teacher trains, is embedded and
    teaches the student through the plugin's names, which only the setup hook makes known in Ray
    workers (without it a worker's registry lacks them and the run fails)."""
    plugins = write_plugin(tmp_path / "plugins")
    cfg = doc_config(
        name="plugins-e2e", device="cpu",
        teachers=[{**doc_config()["teachers"][0], "epochs": 2, "cpus_per_worker": 0.5}],
        embed={"splits": ["train", "test"], "batch_size": 256, "cpus_per_actor": 0.5},
        distill={"epochs": 2, "cpus_per_worker": 0.5},
        run={"arms": [{"name": "logit-mse", "teachers": "all"}], "seeds": [0], "export": False},
        ray={"num_cpus": 2}, tracking={"enabled": False}, tune={"cpus_per_trial": 0.5})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    pids = tmp_path / "pids.txt"
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(tmp_path / "cfg.yaml"),
                             "--out", str(out), "--no-progress"], cwd=tmp_path, env=env_with(plugins, **{PIDS_VAR: str(pids)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])

    summary = json.loads((out / "summary.json").read_text())
    teacher = summary["teachers"]["wide_net"]
    assert summary["dataset"] == "plugin-blobs" and teacher["arch"] == "plugin-net"
    arm = summary["arms"]["logit-mse"]
    assert arm["method"] == "ce+plugin-logit-mse" and arm["teachers"] == ["wide_net"] and len(arm["top1"]) == 1
    # both learned the plugin's 4 classes (chance 0.25; measured: teacher 0.95, student 0.90)
    assert teacher["test_top1"] > 0.5 and 0.5 < arm["top1"][0] <= 1.0
    # the teacher (encoder, dataset) trained, the embed task and the student's trial (encoder, loss)
    # ran in Ray worker processes: each imported the plugin itself, through the job's setup hook
    imported = [int(p) for p in pids.read_text().split()]
    assert proc.pid in imported, "the driver imports the plugins"
    assert set(imported) - {proc.pid}, f"no Ray worker imported the plugin: {imported}"


def test_joined_cluster_workers_import_the_plugins(tmp_path):
    """ray_session on a Ray it joins (RAY_ADDRESS, as inside `ray job submit`): that job's workers
    import the plugins through its runtime_env, in a Ray started without any hook."""
    plugins = write_plugin(tmp_path / "plugins")
    joiner = (
        "import os, ray\n"
        "from ensemble_kd.core.config import RayConfig\n"
        "from ensemble_kd.core.raycluster import ray_session\n"
        "with ray_session(RayConfig(), ['my_plugins']):\n"
        "    probe = ray.remote(lambda: (os.getpid(), __import__('modalities').ENCODERS.names()))\n"
        "    pid, names = ray.get(probe.options(num_cpus=0.5).remote())\n"
        "    assert pid != os.getpid() and 'plugin-net' in names, names\n"
        "    assert 'my_plugins' not in __import__('sys').modules  # this driver never imported it\n"
        "print('joined-ok')\n")
    head = (  # a plain Ray (no setup hook), then the joining command as a second process
        "import os, shutil, subprocess, sys, tempfile, ray\n"
        "tmp = tempfile.mkdtemp(prefix='ekd-pl-', dir='/tmp')  # short: Ray's socket paths are length-limited\n"
        "ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tmp)\n"
        "try:\n"
        "    env = {**os.environ, 'RAY_ADDRESS': ray.get_runtime_context().gcs_address}\n"
        f"    r = subprocess.run([sys.executable, '-c', {joiner!r}], env=env, timeout=240)\n"
        "finally:\n"
        "    ray.shutdown()\n"
        "    shutil.rmtree(tmp, ignore_errors=True)\n"
        "sys.exit(r.returncode)\n")
    r = subprocess.run([sys.executable, "-c", head], cwd=tmp_path, env=env_with(plugins), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "joined-ok" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])


def test_list_with_config_shows_the_plugins_entries(tmp_path):
    plugins = write_plugin(tmp_path / "plugins")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc_config()))
    listed = {}
    for what in ("encoders", "losses"):
        r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "list", what, "--config", str(tmp_path / "cfg.yaml")],
                           cwd=tmp_path, env=env_with(plugins), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        listed[what] = [ln.split()[0] for ln in r.stdout.splitlines()]
    assert "plugin-net" in listed["encoders"] and "mlp" in listed["encoders"]
    assert "plugin-logit-mse" in listed["losses"] and "kd" in listed["losses"]


def test_bad_plugins_are_refused_at_load_in_one_line_naming_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "ekd_raising_plugin.py").write_text("raise RuntimeError('boom: no licence file')\n")
    cases = [  # (plugins, lines of the error, what its last line says)
        (["ekd_no_such_plugin"], 1, ["plugins.0", "'ekd_no_such_plugin'", "cannot be imported", "No module named"]),
        (["json", "ekd_raising_plugin"], 1, ["plugins.1", "'ekd_raising_plugin'", "raised on import",
                                             "RuntimeError: boom: no licence file"]),
        (["my-plugins"], 2, ["plugins.0", "should match pattern", "'my-plugins'"]),  # a typo: the schema's error, header + field
    ]
    for names, n_lines, says in cases:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(doc_config(plugins=names)))
        for argv in (["run", "--config", str(p), "--out", str(tmp_path / "out")], ["list", "encoders", "--config", str(p)]):
            assert main(argv) == 2, (names, argv)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == n_lines and "Traceback" not in err, err
            assert all(s in lines[-1] for s in says) and str(p) in lines[0], err
    assert not (tmp_path / "out").exists()  # refused before any work
