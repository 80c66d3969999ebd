"""`hpcdistill plan`: a seed-sized config's step planned on the CPU (issue 17), no model loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_seed_002_step_plans_micro_batches_and_a_bounded_memory(capsys):
    # Qwen3-1.7B student, 1024 rollouts of up to 16,384 tokens a step (seed 002, appendix A.5)
    assert main(["plan", str(ROOT / "configs/teachability/base.toml"), "--set", "trainer.micro_batch_tokens=34000",
                 "--set", "trainer.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "1024 rollouts a step" in out and "16,777,216 response tokens on rank 0" in out
    assert "512 micro-batches of <= 34,000 forward tokens" in out  # two 16,895-token rows each
    rows = {line[:42].strip(): line[42:].split() for line in out.splitlines() if line.startswith("  ")}
    micro, whole = (float(x) for x in rows["logits / loss"])
    assert micro < 1.0 and whole > 10_000  # [N, V] fp32 for 16.8M tokens x 151,936 vs one chunk
    assert float(rows["total"][0]) < 80  # teacher weights included: fits one 80 GB GPU beside them


def test_an_unknown_model_needs_its_config_file(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[experiment]\nname = "p"\n[model]\nstudent = "org/unknown-7b"\n[train]\nsteps = 1\n')
    assert main(["plan", str(spec)]) == 2
    assert "key 'model.student' / 'model.teacher' = 'org/unknown-7b'" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": True}))
    assert main(["plan", str(spec), "--model-config", str(config)]) == 0
    assert "micro-batches of <= 8,192 forward tokens" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["trainer.micro_batch_tokens=0", "trainer.kernels='triton'"])
def test_bad_trainer_keys_are_spec_errors(key, capsys):
    assert main(["plan", str(ROOT / "configs/quickstart.toml"), "--set", key]) == 2
    assert "trainer." in capsys.readouterr().err
