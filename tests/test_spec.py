"""The spec: loading, inheritance, overrides, sweep expansion and every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdistill.cli import main
from hpcdistill.errors import SpecError
from hpcdistill.spec import expand, load_spec

REPO = Path(__file__).resolve().parents[1]

SWEEP = """
[experiment]
name = "sdpo-window-ablation"
seeds = [0, 1]
output_dir = "{out}"

[train]
steps = 3

[sweep]
grid = {{ "train.lr" = [1e-6, 1e-5], "mask.kind" = ["full", "first_half", "last_half"] }}
zip  = {{ "train.teacher_tau" = [1.0, 0.5], "train.student_tau" = [1.0, 0.5] }}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_sweep_expands_grid_times_zip_times_seeds(tmp_path):
    spec = write(tmp_path, "s.toml", SWEEP.format(out=tmp_path / "runs"))
    runs = expand(load_spec(spec))
    assert len(runs) == 2 * 3 * 2 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    zipped = {(r.overrides["train.teacher_tau"], r.overrides["train.student_tau"]) for r in runs}
    assert zipped == {(1.0, 1.0), (0.5, 0.5)}  # zip varies together, not as a product
    first = runs[0]
    assert first.spec.train.lr == 1e-6 and first.spec.mask.kind == "full" and first.seed == 0


def test_run_ids_are_stable_and_ignore_launch_settings(tmp_path):
    a = write(tmp_path, "a.toml", SWEEP.format(out="runs"))
    b = write(tmp_path, "other/b.toml", SWEEP.format(out="elsewhere") + '\n[launch]\npartition = "gpu"\n')
    ids_a = [r.run_id for r in expand(load_spec(a))]
    ids_b = [r.run_id for r in expand(load_spec(b))]
    assert ids_a == ids_b
    ids_c = [r.run_id for r in expand(load_spec(a, ["train.steps=4"]))]
    assert not set(ids_a) & set(ids_c)


def test_extends_deep_merges_and_this_file_wins(tmp_path):
    write(tmp_path, "base.toml", '[experiment]\nname = "base"\n[rollout]\ntemperature = 0.5\ntop_p = 0.9\n')
    child = write(tmp_path, "sub/child.toml",
                  'extends = "../base.toml"\n[experiment]\nname = "child"\n[rollout]\ntemperature = 0.7\n')
    spec = load_spec(child).spec
    assert spec.experiment.name == "child"
    assert spec.rollout.temperature == 0.7 and spec.rollout.top_p == 0.9


def test_set_overrides_are_validated_like_the_file(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n')
    loaded = load_spec(spec, ["train.steps=2", "rollout.temperature=0.7", 'teacher.context="regen"'])
    assert loaded.spec.train.steps == 2 and loaded.spec.rollout.temperature == 0.7
    assert loaded.spec.teacher.context == "regen"
    with pytest.raises(SpecError, match=r"--set: key 'rollout.temprature': unknown key; did you mean 'rollout.temperature'"):
        load_spec(spec, ["rollout.temprature=0.7"])
    with pytest.raises(SpecError, match=r"--set: key 'train.steps': got -1; allowed: >= 0"):
        load_spec(spec, ["train.steps=-1"])


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    spec = write(tmp_path, "bad.toml", '[experiment]\nname = "x"\n[train]\nlr = = 3\n')
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert str(spec) in str(err.value) and "line 4" in str(err.value) and "column" in str(err.value)


def test_unknown_key_names_key_path_line_and_nearest_valid_key(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n\n[rollout]\ntemprature = 0.5\n')
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    msg = str(err.value)
    assert f"{spec}:5" in msg and "rollout.temprature" in msg and "did you mean 'rollout.temperature'" in msg


def test_unknown_key_in_a_misplaced_section_points_to_where_it_lives(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[model]\nlr = 1e-5\n')
    with pytest.raises(SpecError, match=r"did you mean 'train.lr'"):
        load_spec(spec)


def test_wrong_type_and_range_and_choice_are_all_reported_at_once(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[rollout]\ntemperature = "hot"\n'
                 'top_p = 1.5\nbackend = "vlm"\n')
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "rollout.temperature': expected a number, got 'hot'" in msg
    assert "rollout.top_p': got 1.5; allowed: > 0 and <= 1" in msg
    assert "rollout.backend': got 'vlm'; allowed: 'transformers', 'vllm' (did you mean 'vllm'?)" in msg


def test_extends_cycle_and_missing_file_are_errors(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n[experiment]\nname = "a"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(SpecError, match="cycle in the extends chain"):
        load_spec(tmp_path / "a.toml")
    missing = write(tmp_path, "c.toml", 'extends = "nope.toml"\n[experiment]\nname = "c"\n')
    with pytest.raises(SpecError, match=r"c.toml: key 'extends': file not found: nope.toml"):
        load_spec(missing)


def test_sweep_key_that_is_not_in_the_schema_is_an_error(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[sweep]\ngrid = { "train.lrr" = [1, 2] }\n')
    with pytest.raises(SpecError, match=r"sweep.grid.\"train.lrr\"': no such key .* did you mean 'train.lr'"):
        expand(load_spec(spec))


def test_sweep_value_of_the_wrong_type_is_an_error(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[sweep]\ngrid = { "train.lr" = ["big"] }\n')
    with pytest.raises(SpecError, match=r"train.lr': expected a number, got 'big'"):
        expand(load_spec(spec))


def test_sweep_of_zero_runs_and_over_the_limit_are_errors(tmp_path):
    empty = write(tmp_path, "e.toml", '[experiment]\nname = "x"\n[sweep]\ngrid = { "train.lr" = [] }\n')
    with pytest.raises(SpecError, match="expands to zero runs"):
        expand(load_spec(empty))
    big = write(tmp_path, "b.toml", '[experiment]\nname = "x"\nnum_seeds = 30\n[launch]\nmax_runs = 20\n'
                '[sweep]\ngrid = { "train.lr" = [1e-6, 1e-5] }\n')
    with pytest.raises(SpecError, match=r"expands to 60 runs, more than launch.max_runs = 20"):
        expand(load_spec(big))
    assert len(expand(load_spec(big), force=True)) == 60


def test_zip_lists_of_different_lengths_are_an_error(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[sweep]\n'
                 'zip = { "train.teacher_tau" = [1.0, 0.5], "train.student_tau" = [1.0] }\n')
    with pytest.raises(SpecError, match="same length"):
        expand(load_spec(spec))


def test_expand_json_lists_run_id_seed_and_overrides(tmp_path, capsys):
    spec = write(tmp_path, "s.toml", SWEEP.format(out=tmp_path / "runs"))
    assert main(["expand", str(spec), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 24
    assert set(runs[0]) >= {"run_id", "seed", "overrides"}
    assert runs[0]["overrides"]["mask.kind"] == "full"


@pytest.mark.parametrize("text,needle", [
    ('[experiment]\nname = "x"\n[train]\nlr = = 3\n', "TOML syntax error"),
    ('[experiment]\nname = "x"\n[trian]\nlr = 3\n', "did you mean 'train'"),
    ('[experiment]\nname = "x"\n[train]\nsteps = "many"\n', "expected an integer"),
])
def test_cli_prints_one_message_exits_2_and_writes_nothing(tmp_path, text, needle):
    spec = write(tmp_path, "s.toml", text.replace('name = "x"', f'name = "x"\noutput_dir = "{tmp_path / "runs"}"'))
    out = subprocess.run([sys.executable, "-m", "hpcdistill.cli", "submit", str(spec)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_shipped_configs_all_validate():
    configs = sorted((REPO / "configs").rglob("*.toml"))
    assert configs
    for path in configs:
        if path.name.endswith(".part.toml"):
            continue
        runs = expand(load_spec(path), force=True)
        assert runs, path


def test_sweep_over_a_table_varies_several_keys_together(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\nnum_seeds = 2\n[sweep.grid]\n'
                 'model = [{ student = "a", teacher = "A" }, { student = "b", teacher = "B" }]\n'
                 'train = [{ method = "hybrid" }, { method = "extended_on_policy", steps = 200 }]\n')
    runs = expand(load_spec(spec))
    assert len(runs) == 2 * 2 * 2
    pairs = {(r.spec.model.student, r.spec.model.teacher, r.spec.train.method, r.spec.train.steps) for r in runs}
    assert ("b", "B", "extended_on_policy", 200) in pairs and ("a", "A", "hybrid", 0) in pairs
    bad = write(tmp_path, "b.toml", '[experiment]\nname = "x"\n[sweep.grid]\nmodel = [{ studnet = "a" }]\n')
    with pytest.raises(SpecError, match="model.studnet': unknown key; did you mean 'model.student'"):
        expand(load_spec(bad))


def test_a_key_written_at_its_default_keeps_the_run_id_and_a_changed_one_does_not(tmp_path):
    # New keys arrive with defaults that keep the old behaviour: completed runs keep their ids.
    base = write(tmp_path, "a.toml", SWEEP.format(out="runs"))
    ids = [r.run_id for r in expand(load_spec(base))]
    assert ids == [r.run_id for r in expand(load_spec(base, ['train.divergence="reverse"',
                                                            'teacher.weights="live"']))]
    assert not set(ids) & {r.run_id for r in expand(load_spec(base, ['train.divergence="forward"']))}


def test_legacy_objective_names_are_presets_of_distill_with_the_same_run_id(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[train]\nobjective = "jsd"\nbeta = 0.3\n')
    loaded = load_spec(spec)
    train = loaded.spec.train
    assert (train.objective, train.support, train.divergence, train.beta) == ("distill", "full", "jsd", 0.3)
    canonical = write(tmp_path, "c.toml", '[experiment]\nname = "x"\n[train]\nsupport = "full"\n'
                                          'divergence = "jsd"\nbeta = 0.3\n')
    assert expand(loaded)[0].run_id == expand(load_spec(canonical))[0].run_id
    with pytest.raises(SpecError, match=r"key 'train.divergence'.*objective = 'jsd' means objective = 'distill'"):
        load_spec(spec, ['train.divergence="reverse"'])


@pytest.mark.parametrize("override,needle", [
    ("train.gamma=0.9", r"'train.gamma': is read only when train.support is 'sampled'"),
    ('train.estimator="k3"', r"'train.estimator': is read only when train.support is 'sampled'"),
    ("train.beta=0.2", r"'train.beta': is read only when train.divergence is 'jsd'"),
    ("teacher.ema_rate=0.5", r"'teacher.ema_rate': is read only when teacher.weights is 'ema'"),
    ('teacher.feedback_template="{problem} {answer}"', r"uses \{answer\}; allowed fields: \{problem\}, \{feedback\}"),
    ('teacher.demonstration_section="{demonstration"', r"'teacher.demonstration_section': not a valid template"),
    ('teacher.weights="ema"', None),
    ("train.on_policy_fraction=0.5", None),
])
def test_keys_read_only_under_another_value_and_bad_templates_are_errors(tmp_path, override, needle):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[train]\nsteps = 1\n')
    if needle is None:
        load_spec(spec, [override])  # fine on its own
        return
    with pytest.raises(SpecError, match=needle):
        load_spec(spec, [override])


def test_a_self_teacher_needs_the_students_weights_and_lambda_needs_an_on_policy_method(tmp_path):
    spec = write(tmp_path, "s.toml", '[experiment]\nname = "x"\n[model]\nteacher = "other/model"\n'
                                     '[teacher]\nweights = "ema"\n[train]\nmethod = "hybrid"\n'
                                     'on_policy_fraction = 0.5\n')
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "key 'teacher.weights'" in str(err.value) and "model.teacher = 'other/model'" in str(err.value)
    assert "key 'train.on_policy_fraction'" in str(err.value) and "method 'hybrid'" in str(err.value)
