import pytest
"""The command line end to end at a tiny size, on the session's local Ray."""
import json

from ensemble_kd.cli import main
from ensemble_kd.core.config import to_yaml
from tests.helpers import tiny_config


@pytest.mark.slow
def test_run_trains_embeds_then_reuses(ray_cluster, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "out", **{"embed.splits": ["train", "test"], "distill.epochs": 2,
                                           "distill.teachers": ["kar_mlp"], "distill.cpus_per_worker": 0.5,
                                           "distill.losses": [{"name": "ce"}, {"name": "kd"}]})
    p = tmp_path / "tiny.yaml"
    p.write_text(to_yaml(cfg))
    assert main(["run", "--config", str(p), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 shards under" in out and "(0 reused)" in out and "pix_cnn" in out
    assert "student mlp on fou, 2 epochs" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("distill "))
    assert row.split()[1:5] == ["all", "single", "ce+kd", "kar_mlp"]  # labels, teacher set, method, teachers
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'out' / 'mlflow.db'}" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["arms"]["distill"]["teacher_set"] == "single" and summary["arms"]["distill"]["seeds"] == [0]
    assert 0.0 <= summary["arms"]["distill"]["mean_top1"] <= 1.0 and (tmp_path / "out" / "summary.png").stat().st_size > 0
    assert main(["run", "--config", str(p), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(4 reused)" in out and out.count("reused (") == 4 and "teacher kar_mlp: reused" in out


def test_embed_without_checkpoints_says_what_to_run(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(tiny_config(tmp_path / "empty")))
    assert main(["embed", "--config", str(p)]) == 2
    assert "ensemble-kd teachers train" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("teachers:\n  - {name: a, arch: resnet_8x4, modality: pix}\n")
    assert main(["teachers", "train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "teachers.0.arch" in err and "resnet8x4" in err and str(p) in err


def test_list_and_config_docs(capsys):
    assert main(["list", "encoders"]) == 0
    assert "resnet32x4" in capsys.readouterr().out
    assert main(["list", "datasets"]) == 0
    assert "uci-mfeat" in capsys.readouterr().out
    assert main(["config", "docs"]) == 0
    assert "gpus_per_actor" in capsys.readouterr().out
    assert main(["config", "show", "--set", "teachers.0.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
