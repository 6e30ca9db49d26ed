import os

import pytest

from tools import compare
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = {100: 5.0, 200: 4.0, 300: 3.0}
    assert compare.tokens_to_reach(curve, 3.5) == pytest.approx(250)
    assert compare.tokens_to_reach(curve, 5.5) == 100
    assert compare.tokens_to_reach(curve, 3.0) == 300
    assert compare.tokens_to_reach(curve, 2.9) is None


def test_results_table_ratio_and_short_runs():
    curves = {"gpt3": {100: 5.0, 200: 4.0}, "fast": {100: 4.5, 200: 3.5}}
    table = compare.results_table(curves, {("fast", 0.6): {120: 3.9}})
    assert "| 100 | 5.0000 | 4.5000 |" in table
    assert "| fast | 3.5000 | 150 | 0.75 |" in table  # 4.0 reached halfway between 100 and 200
    assert "| gpt3 | 4.0000 | 200 | 1.00 |" in table
    assert "| fast | 120 (0.60x) | 3.9000 | yes (-0.1000) |" in table


def test_a_third_recipe_is_measured_against_each_one_before_it():
    """gpt3, fast, modern: modern's tokens to fast's final as well as to gpt3's, and each short run
    checked against both finals (--short=modern@0.7,modern@0.3)."""
    curves = {"gpt3": {100: 5.0, 200: 4.0}, "fast": {100: 4.5, 200: 3.5}, "modern": {100: 3.5, 200: 3.0}}
    short = {("modern", 0.7): {140: 3.4}, ("modern", 0.3): {60: 3.8}}
    table = compare.results_table(curves, short)
    assert "Tokens to reach fast's (fast) final val loss 3.5000" in table
    assert "| modern | 3.0000 | 100 | 0.50 |" in table  # fast's 3.5 at modern's first evaluation
    assert "| modern | 140 (0.70x) | 3.4000 | yes (-0.6000) | yes (-0.1000) |" in table
    assert "| modern | 60 (0.30x) | 3.8000 | yes (-0.2000) | no (+0.3000) |" in table
    specs = ["gpt3", "fast", "modern"]
    assert compare.short_runs("modern@0.7,modern@0.3", specs) == [("modern", 0.7), ("modern", 0.3)]
    assert compare.short_runs("0.6", specs) == [("fast", 0.6), ("modern", 0.6)]
    assert compare.short_runs("0", specs) == []
    with pytest.raises(ValueError, match="not one of the non-baseline --recipes"):
        compare.short_runs("gpt3@0.5", specs)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        compare.short_runs("modern@1.5", specs)


def test_recipes_and_settings_are_checked():
    assert compare.recipe_args("gpt3") == ["--recipe=gpt3"]
    assert compare.recipe_args("fast:muon_lr=0.04:max_lr=2e-3") == ["--recipe=fast", "--muon_lr=0.04", "--max_lr=2e-3"]
    assert compare.recipe_args("gpt3:attention=gpt3:attention_band=128") == [  # dense against banded (docs/attention.md)
        "--recipe=gpt3", "--attention=gpt3", "--attention_band=128"]
    with pytest.raises(ValueError, match="unknown recipe 'slow'"):
        compare.recipe_args("slow")
    with pytest.raises(ValueError, match="name=value"):
        compare.recipe_args("fast:muon_lr")
    bench, shared = compare.parse_args(["--tokens=1e6", "--n_embd=384"])
    assert bench.tokens == 1e6 and shared["n_embd"] == "384" and shared["model"] == "tiny"
    with pytest.raises(ValueError, match="--max_steps"):
        compare.parse_args(["--max_steps=5"])


def test_a_preset_or_a_setting_given_beats_the_demos_size():
    """Issue 28.10: --model=gpt2 (docs/recipes.md's 124M command) trained 12 layers at the demo's
    128 wide. The preset's size and batch train, a setting given still wins, and the line the
    results table starts with names the size each recipe trains."""
    _, shared = compare.parse_args(["--model=gpt2", "--n_layer=4", "--micro_batch_size=8"])
    assert not {"n_embd", "n_head", "total_batch_size"} & set(shared)  # the demo's 128 wide, 2 heads, 4,096 tokens
    s, config = compare.resolve(shared, "fast")
    assert (config.n_layer, config.n_head, config.n_embd, s.seq_len) == (4, 12, 768, 1024)
    assert (s.total_batch_size, s.micro_batch_size, s.optimizer) == (2**19, 8, "muon")
    assert compare.describe_models(shared, ["gpt3", "modern"]) == (
        "model: gpt2, 4 layers, 12 heads, 768 wide, context 1024 (gpt3 67,772,928 parameters, modern 105,578,496 "
        "parameters)")
    # by hand: gpt3: 50,304 x 768 tokens + 1,024 x 768 positions + 4 blocks of 12 x 768^2 weights, 9 x 768
    # biases and two LayerNorms' 4 x 768 + a final LayerNorm's 2 x 768; modern: rotary positions, no biases,
    # no gains (RMSNorm), and an untied head of 50,304 x 768 more
    C = 768
    assert 50304 * C + 1024 * C + 4 * (12 * C * C + 9 * C + 4 * C) + 2 * C == 67_772_928
    assert 2 * 50304 * C + 4 * 12 * C * C == 105_578_496


def test_compare_trains_recipes_side_by_side(shards, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    sizes = {k: v for k, v in TINY.items() if k in ("n_layer", "n_head", "n_embd", "block_size", "micro_batch_size",
                                                    "total_batch_size", "dtype")}
    args = [f"--{k}={v}" for k, v in sizes.items()] + [
        f"--data_dir={shards}", f"--out_dir={out}", "--tokens=2048", "--evals=2", "--short=0.5",
        "--val_tokens=2048", "--recipes=gpt3,fast:muon_lr=0.05"]
    curves, short = compare.main(args)
    assert list(curves) == ["gpt3", "fast:muon_lr=0.05"]
    assert sorted(curves["gpt3"]) == sorted(curves["fast:muon_lr=0.05"]) == [1024, 2048]  # the same token counts
    assert max(short["fast:muon_lr=0.05", 0.5]) == 1024
    printed = capsys.readouterr().out
    assert "under one epoch" in printed and "ratio to baseline" in printed
    assert os.path.getsize(os.path.join(out, "val_loss.png")) > 1000
    results = open(os.path.join(out, "results.md")).read()
    assert "tokens to reach it" in results
    assert "model: tiny, 2 layers, 2 heads, 32 wide, context 32 (gpt3 1," in results
    assert "8 steps of 256 tokens" in results


def test_a_budget_over_one_epoch_is_said():
    assert "under one epoch" in compare.epoch_note(1000, 1000, "d")
    assert "MORE than one epoch of d's 999 train tokens" in compare.epoch_note(1000, 999, "d")
