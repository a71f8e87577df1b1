"""Every script under bench/ still runs (tiny sizes): a bench that stops running is a bug."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared(ray_cluster, tmp_path_factory):
    """What the benches that train the default's teachers share: the session's Ray (joined through
    RAY_ADDRESS, as on a cluster: no Ray start per bench) and one --workdir, so only the first of
    them trains the teachers and writes the shards; the others reuse them. These tests run in one
    xdist group (one worker, one after another)."""
    return {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
            "workdir": str(tmp_path_factory.mktemp("bench-work"))}


def _bench(script: str, *args: str, ray_address: str | None = None) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)  # a bench starts (and stops) its own local Ray, unless given one
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return _last_json(r.stdout)


def _last_json(out: str):
    """The JSON document a bench prints last, after whatever log lines Ray's workers print."""
    lines = out.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i][:1] in ("{", "["):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON in the bench's output: {out[-2000:]}")


@pytest.mark.slow
@pytest.mark.xdist_group("bench-workdir")
def test_step_cost_runs_and_keeps_its_keys(shared):
    res = _bench("step_cost.py", "--negatives", "64", "--batch", "32", "--steps", "1", "--teacher-epochs", "1",
                 "--workdir", shared["workdir"], ray_address=shared["RAY_ADDRESS"])
    for k in ("a_ce_ms", "b_crd_kd_1t_shared_ms", "b_crd_kd_3t_per_sample_ms", "c_reference_3t_ms",
              "ratio_b_shared_1t_over_a", "ratio_b_shared_3t_over_a", "ratio_c_over_b_per_sample_3t"):
        assert isinstance(res[k], float) and res[k] > 0, k


@pytest.mark.slow
def test_embed_throughput_runs():
    res = _bench("embed_throughput.py", "--dataset", "uci-mfeat", "--modality", "pix", "--arch", "cnn_small",
                 "--views", "1", "--repeats", "1")
    assert res["rows"] == 1500 and res["bare_rows_per_s"] > 0 and res["task_rows_per_s_steady"] > 0


def test_negative_sampling_runs():
    res = _bench("negative_sampling.py", "--rows", "2000", "--classes", "10", "--negatives", "256", "--batch", "8",
                 "--steps", "1")
    for mode in ("class-aware", "uniform"):
        assert res[f"{mode}_ms"] > 0 and res[f"{mode}_repeat_share"] == 0.0, mode


@pytest.mark.slow
def test_online_step_cost_runs():
    res = _bench("online_step_cost.py", "--setting", "mlp", "--steps", "1", "--batch", "16", "--negatives", "64")
    assert res[0]["ce_ms"] > 0 and res[0]["ratio_online_over_ce"] > 0 and res[0]["ratio_shards_over_ce"] > 0


@pytest.mark.slow
@pytest.mark.xdist_group("bench-workdir")
def test_trial_overhead_runs_and_splits_the_wall_time(shared):
    res = _bench("trial_overhead.py", "--trials", "1", "--epochs", "1", "--teacher-epochs", "1", "--arm", "kd-ensemble",
                 "--workdir", shared["workdir"], ray_address=shared["RAY_ADDRESS"])
    assert res["statuses"] == ["TERMINATED"] and res["loop_steps_s"] > 0 and res["trial_wall_s"] >= res["loop_steps_s"]
    assert res["ratio_wall_over_steps"] >= 1.0


@pytest.mark.slow
@pytest.mark.xdist_group("bench-workdir")
def test_gpu_smoke_runs_every_part_on_cpu(shared):
    res = _bench("gpu_smoke.py", "--device", "cpu", "--epochs", "1", "--workdir", shared["workdir"],
                 ray_address=shared["RAY_ADDRESS"])
    for part in ("teachers", "embed", "shards", "online", "faiss"):
        assert res[part]["status"] == "ok", (part, res[part])
    assert res["status"] == "ok" and res["faiss"]["index"] == "faiss-cpu"


@pytest.mark.slow
def test_data_scale_runs_and_keeps_its_keys():
    res = _bench("data_scale.py", "--rows", "2000", "4000", "--scaling-rows", "4000", "--steps", "3", "--warmup", "1")
    assert res["rows"] == [2000, 4000]
    for k in ("worker_private_rss_mb", "step_ms", "embed_rows_per_s", "worker_private_rss_mb_crd", "step_ms_crd",
              "crd_memory_mb", "store_mb", "prepare_s"):
        assert len(res[k]) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in res[k]), (k, res[k])
    assert set(res["embed_scaling"]) == {"1", "2"} and all(v > 0 for v in res["embed_scaling"].values()), res["embed_scaling"]
    assert res["crd_memory_mb"][1] > res["crd_memory_mb"][0]  # rows x feat_dim x 4 B per memory: twice the rows


def test_gpu_parts_runs_on_cpu():
    res = _bench("gpu_parts.py", "--device", "cpu", "--steps", "4")
    assert res["store"]["equal_to_source"] and res["store"]["round_trip_equal"] and res["shards"]["finite"]
    for arm in ("ce+kd", "ce+kd+crd_exact_shared", "ce+kd+crd_reference_per_sample"):
        assert res["steps"][arm]["device"]["finite"] and res["steps"][arm]["first_loss_rel_diff"] == 0.0, arm
    assert res["memory"]["max_abs_diff"] == 0.0


def test_job_upload_runs_and_the_gitignore_keeps_outputs_out():
    res = _bench("job_upload.py", "--output-mb", "3", "--no-venv")
    assert res["with_gitignore_mb"] == res["checkout_mb"] < 20  # the output folder and caches are not uploaded
    assert res["without_gitignore_mb"] > res["with_gitignore_mb"] + 3


@pytest.mark.slow
def test_gpu_e2e_runs_every_stage_on_cpu(ray_cluster, tmp_path):
    """bench/gpu_e2e.py's code path, on the CPU at its tiny size (a lent GPU runs the same with
    --device cuda): the default run interrupted and resumed, the CIFAR-sized run on both paths,
    and the JSON it writes; every stage on the CPU, as asked."""
    out = tmp_path / "gpu_e2e.json"
    res = _bench("gpu_e2e.py", "--device", "cpu", "--tiny", "--json", str(out), "--logs", str(tmp_path / "logs.tar.gz"),
                 ray_address=ray_cluster.get_runtime_context().gcs_address)
    assert json.loads(out.read_text())["status"] == res["status"] == "ok", res
    for k in ("device", "stage_seconds", "step_ms", "peak_accel_mem_mb", "on_gpu", "resume", "syncs", "stages"):
        assert k in res, k
    assert res["device"] == "cpu" and res["syncs"]["status"].startswith("skipped: cpu")
    assert set(res["on_gpu"]) == {"default_teachers", "default_embed", "default_trials", "cifar_teachers",
                                  "cifar_embed", "cifar_trials"} and not any(res["on_gpu"].values()), res["on_gpu"]
    assert all(v == 0.0 for v in res["peak_accel_mem_mb"].values()), res["peak_accel_mem_mb"]  # no accelerator
    assert {"default/student-ce", "default/crd+kd-ensemble", "cifar/crd-shards", "cifar/crd-online"} <= set(res["step_ms"])
    assert all(v > 0 for v in res["step_ms"].values()), res["step_ms"]
    for k in ("default_run_interrupted", "default_run_resumed", "cifar_run", "cifar_trials_s"):
        assert res["stage_seconds"][k] > 0, k
    r = res["resume"]  # Ctrl-C killed a trial after its first saved epoch; --resume finished it from there
    assert r["rc"] == 0 and r["killed_trials"] and set(r["resumed_from_epochs"]) >= {n for n in r["killed_trials"].values()}
    assert all(n == 10 for n in r["killed_trials_finished"].values()), r
    trials = res["stages"]["cifar"]["trials"].values()
    assert sorted(t["arm"] for t in trials) == ["crd-online", "crd-shards"] and all(t["devices"] == ["cpu"] for t in trials)
    assert (tmp_path / "logs.tar.gz").stat().st_size > 0


def test_gpu_wheels_repacks_a_wheel_that_pip_still_installs(tmp_path):
    """bench/gpu_wheels.py's repack (the step that makes the wheels fit one device call: members
    dropped, RECORD rewritten, LZMA), on a small wheel built here; pip installs the result and the
    dropped package is gone. (Downloading the real wheels needs the package index: not in tests.)"""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "bench" / "gpu_wheels.py")
    gw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gw)
    files = {"ekdtiny/__init__.py": b"VALUE = 7\n", "ekdtiny/big/__init__.py": b"X = 1\n" * 1000,
             "ekdtiny-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ekdtiny\nVersion: 0.1\n",
             "ekdtiny-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(gw.record_line(n, d) for n, d in files.items()) + "ekdtiny-0.1.dist-info/RECORD,,\n"
    wheel = tmp_path / "ekdtiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for n, d in {**files, "ekdtiny-0.1.dist-info/RECORD": record.encode()}.items():
            z.writestr(n, d)
    gw.repack(wheel, drop=("ekdtiny/big/",), strip=(), lzma=True)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "ekdtiny/big/__init__.py" not in names and "ekdtiny/__init__.py" in names
        assert "ekdtiny/big" not in z.read("ekdtiny-0.1.dist-info/RECORD").decode()
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (target / "ekdtiny" / "__init__.py").read_text() == "VALUE = 7\n" and not (target / "ekdtiny" / "big").exists()
