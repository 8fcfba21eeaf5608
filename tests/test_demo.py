"""`bigmodel demo`: its own help and options, its cache folder, and its report of the memory
it really used (run on a tiny model, so the test stays small)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _cli import run_cli

from bigmodel import demo

TINY_CONFIG = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def test_demo_help_is_the_demos_own(tmp_path):
    result = run_cli("demo", "--help", XDG_CACHE_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: bigmodel demo")
    for option in ("--budget", "--tokens", "--dir"):
        assert option in result.stdout
    unwrapped = "".join(result.stdout.split())  # help wraps long lines, even inside a path
    assert f"(default:{tmp_path / 'bigmodel' / 'demo'})" in unwrapped  # where it keeps its model
    assert "{inspect,ls" not in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--budget", "lots"], "--budget='lots' is not a size"),
        (["--tokens", "many"], "argument --tokens"),
    ],
)
def test_bad_demo_options_are_refused_before_anything_is_written(tmp_path, argv, message):
    result = run_cli("demo", *argv, XDG_CACHE_HOME=str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_cache_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_folder() == tmp_path / "xdg" / "bigmodel" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_folder() == tmp_path / "home" / ".cache" / "bigmodel" / "demo"


def test_the_demo_refuses_a_folder_without_room(tmp_path):
    with pytest.raises(OSError, match=f"needs .* in {tmp_path / 'demo'}, but only"):
        demo._check_free_space(tmp_path / "demo", 10**18)


def test_checkpoint_size_is_the_real_one(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    parameters = sum(p.numel() for p in model.parameters())
    assert demo.checkpoint_size(TINY_CONFIG) == 4 * parameters


def test_the_demo_reports_the_memory_it_used_next_to_its_budget(tmp_path, capsys):
    folder = tmp_path / "demo"
    budget = demo.checkpoint_size(TINY_CONFIG) // 2  # about half the layers on disk
    assert demo.run(folder, budget, 3, TINY_CONFIG)
    out = capsys.readouterr().out
    lines = out.splitlines()
    size = demo.format_size(demo.checkpoint_size(TINY_CONFIG))
    assert lines[0].startswith(f"building the demo checkpoint in {folder}: {size} on disk")
    report = dict(line.split("  ", 1) for line in lines if "  " in line)
    report = {label.strip(): value.strip() for label, value in report.items()}
    assert report["RAM budget (max_memory cpu)"] == demo.format_size(budget)
    assert report["peak RSS over baseline"].endswith("(VmHWM)")
    page_cache = report["page cache left by the run"]
    assert "of checkpoint and offload files" in page_cache
    assert not page_cache.startswith("0 B")  # the resident weights are views of the files
    assert report["tokens equal the in-RAM run's"] == "yes"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "offload", "reference.json"]
    # A second run reuses the checkpoint.
    assert demo.run(Path(folder), budget, 3, TINY_CONFIG)
    assert "building" not in capsys.readouterr().out
