import pytest

from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import (
    ConfigError,
    EmbedConfig,
    ExperimentConfig,
    TeacherConfig,
    config_hash,
    field_docs,
    flatten,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)
from tests.helpers import tiny_config


def test_embedded_default_loads_and_round_trips(tmp_path):
    cfg = load_config(None)
    assert cfg.data.name == "uci-mfeat" and len(cfg.teachers) >= 2
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(p)
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_flatten_has_dotted_scalars():
    flat = flatten(load_config(None))
    assert flat["teachers.0.arch"] == "cnn_small"
    assert flat["embed.views.num_views"] == 1
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("teachers:\n  - {name: a, arch: mlp, modality: kar, epoch: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "teachers.0.epoch: unknown key" in str(e.value) and str(p) in str(e.value)


def test_bad_value_and_missing_field_are_named():
    with pytest.raises(ConfigError, match=r"embed.batch_size"):
        from_dict({"embed": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"teachers.0.name: required"):
        from_dict({"teachers": [{"arch": "mlp"}]})


def test_registry_names_are_checked():
    """The schema takes any name; the cross-checks against the registries name the field."""
    bad = {"teachers": [{"name": "a", "arch": "resnet_8x4", "modality": "pix"}]}
    assert from_dict(bad).teachers[0].arch == "resnet_8x4"  # the schema alone does not know the registry
    with pytest.raises(ConfigError, match=r"teachers.0.arch: unknown encoder 'resnet_8x4'.*resnet8x4"):
        check_config(from_dict(bad))
    with pytest.raises(ConfigError, match=r"teachers.0.modality: .*has no modality 'rgb'.*fou"):
        check_config(from_dict({"teachers": [{"name": "a", "arch": "mlp", "modality": "rgb"}]}))
    with pytest.raises(ConfigError, match=r"data.name: unknown dataset"):
        check_config(from_dict({"data": {"name": "imagenet"}}))
    with pytest.raises(ConfigError, match=r"distill.losses.1.kwargs: loss 'crd' has no option\(s\) \['tauu'\]"):
        check_config(from_dict({"teachers": [{"name": "a", "arch": "mlp", "modality": "kar"}],
                                "distill": {"teachers": ["a"], "losses": [{"name": "ce"}, {"name": "crd", "kwargs": {"tauu": 1}}]}}))


def test_duplicate_teacher_names_rejected():
    with pytest.raises(ConfigError, match="unique"):
        from_dict({"teachers": [{"name": "a", "modality": "kar"}, {"name": "a", "modality": "fac"}]})


def test_configs_are_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(Exception):
        cfg.name = "x"  # type: ignore[misc]


def test_overrides_and_missing_file(tmp_path):
    cfg = load_config(None, {"teachers.0.epochs": 3, "output_dir": str(tmp_path)})
    assert cfg.output_dir == str(tmp_path) and cfg.teachers[0].epochs == 3
    with pytest.raises(ConfigError, match="has no item '9'"):
        load_config(None, {"teachers.9.epochs": 3})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("cls", [ExperimentConfig, TeacherConfig, EmbedConfig])
def test_every_field_has_a_doc(cls):
    docs = field_docs(cls)
    assert docs and all(docs.values()), [k for k, v in docs.items() if not v]


def test_adv_replay_teacher_must_be_a_distill_teacher(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.adv_replay_teacher: 'pix_cnn' is not one of distill.teachers \['kar_mlp'\]"):
        tiny_config(tmp_path, **{"distill.teachers": ["kar_mlp"], "distill.adv_replay_teacher": "pix_cnn"})
    ok = tiny_config(tmp_path, **{"distill.teachers": ["pix_cnn"], "distill.adv_replay_teacher": "pix_cnn"})
    assert ok.distill.adv_replay_teacher == "pix_cnn" and ok.distill.teachers == ("pix_cnn",)


def test_relative_paths_become_absolute_where_the_config_is_loaded(tmp_path, monkeypatch):
    """Tune trials and Ray Train workers run in other working directories: every path field is
    resolved against the directory the config was loaded in."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"output_dir": "out", "data.root": "data", "teachers.0.checkpoint": "ckpt/t.pt",
                             "distill.selection": "sel", "run.arms": [], "run.sweep": None})
    assert cfg.output_dir == str(tmp_path / "out") and cfg.data.root == str(tmp_path / "data")
    assert cfg.teachers[0].checkpoint == str(tmp_path / "ckpt" / "t.pt")
    assert cfg.distill.selection == str(tmp_path / "sel")
    monkeypatch.chdir("/")
    assert from_dict(to_dict(cfg)) == cfg  # already absolute: loading elsewhere changes nothing


def test_old_resource_field_names_are_refused_naming_the_new_one():
    """One naming scheme for CPUs (cpus_per_worker / cpus_per_actor / cpus_per_trial), with no
    shims for the old names: a config or --set with one is refused with the name to use."""
    with pytest.raises(ConfigError, match="num_cpus_per_actor.*did you mean 'cpus_per_actor'"):
        from_dict({"embed": {"num_cpus_per_actor": 0.25}})
    with pytest.raises(ConfigError, match=r"--set embed\.num_gpus_per_actor=0\.5.*did you mean 'gpus_per_actor'"):
        load_config(None, {"embed.num_gpus_per_actor": 0.5})
    with pytest.raises(ConfigError, match="trial_cpus"):
        from_dict({"tune": {"trial_cpus": 0.3}})
