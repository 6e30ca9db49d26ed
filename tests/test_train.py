import math
import os

import pytest
import torch

import train_gpt
from conftest import read_metrics, tiny_args, train_losses
from model import GPT, GPTConfig
from train_gpt import Settings, accum_steps_at, clip_gradients, lr_at, parse_settings


def run(args):
    train_gpt.main(args)


def fail(args, match):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(args)
    assert e.value.code != 0
    assert any(m in str(e.value.code) for m in match.split("|")), e.value.code
    return str(e.value.code)


def _model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50257, (2, 16))
    model(x, x)[1].mul(50.0).backward()  # a gradient with norm far above 1
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_clip_gradients_matches_torch_clip_then_adamw(fused):
    ref = _model_with_grads()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    ref_opt.step()

    model = _model_with_grads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    norm = clip_gradients(list(model.parameters()), opt, 1.0)
    opt.step()
    assert ref_norm.item() > 10
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
        # AdamW's update hardly changes when the whole gradient is scaled; its moments do
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], rtol=1e-5, atol=1e-9)


def test_clip_gradients_zero_means_never():
    model = _model_with_grads()
    before = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    norm = clip_gradients(list(model.parameters()), opt, 0.0)
    assert norm.item() > 10 and getattr(opt, "grad_scale", None) is None
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_lr_schedule():
    s = Settings(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert lr_at(0, s) == pytest.approx(6e-4 / 715)
    assert lr_at(357, s) == pytest.approx(6e-4 * 358 / 715)
    assert lr_at(715, s) == pytest.approx(6e-4)  # peak right after warmup
    mid = 715 + (19073 - 715) // 2
    assert lr_at(mid, s) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert lr_at(19073, s) == pytest.approx(6e-5)
    assert lr_at(19072, s) == pytest.approx(6e-5, rel=1e-3)


def test_defaults_are_the_seed_recipe():
    s = parse_settings([])
    train_gpt.resolve_model_settings(s)
    assert (s.total_batch_size, s.seq_len, s.max_lr, s.min_lr) == (2**19, 1024, 6e-4, pytest.approx(6e-5))
    assert (s.warmup_steps, s.max_steps, s.weight_decay, s.grad_clip) == (715, 19073, 0.1, 1.0)
    g3 = parse_settings(["--model=gpt3-xl"])
    train_gpt.resolve_model_settings(g3)
    assert (g3.seq_len, g3.total_batch_size, g3.max_lr) == (2048, 2**20, 2e-4)
    assert parse_settings(["--model=gpt3-xl", "--max_lr=1e-3", "--compile=False"]).max_lr == 1e-3


def test_batch_size_warmup_ramps_from_32k():
    s = Settings(total_batch_size=2**19, batch_warmup_tokens=10**9)
    per_micro = 16 * 1024
    assert accum_steps_at(0, s, per_micro) == 2  # 32K tokens
    assert accum_steps_at(5 * 10**8, s, per_micro) == round((2**15 + (2**19 - 2**15) / 2) / per_micro)
    assert accum_steps_at(10**9, s, per_micro) == 32
    assert accum_steps_at(0, Settings(total_batch_size=2**19), per_micro) == 32  # off by default


def test_bad_settings_are_refused_clearly(shards, tmp_path):
    msg = fail(["--no_such=1"], "unknown setting --no_such")
    assert "max_lr" in msg  # lists the valid ones
    fail(["--max_steps=abc"], "--max_steps takes an integer")
    fail(["--compile=maybe"], "takes True or False")
    fail(["--model=gpt5"], "unknown --model")
    fail(tiny_args(shards, str(tmp_path), n_head=3), "not divisible by n_head=3")
    msg = fail(tiny_args(shards, str(tmp_path), total_batch_size=1000), "not divisible")
    assert msg.endswith("Values that work: --total_batch_size=896 or 1024.")  # no micro batch size divides 1000
    msg = fail(tiny_args(shards, str(tmp_path), total_batch_size=4 * 32 * 3, micro_batch_size=8), "not divisible")
    assert msg.endswith("Values that work: --micro_batch_size in [1, 2, 3, 4, 6, 12], or --total_batch_size=256 or 512.")
    fail(tiny_args(shards, str(tmp_path), seq_len=64), "longer than the model's block_size")
    fail(tiny_args(str(tmp_path / "nowhere"), str(tmp_path)), "does not exist")
    fail(tiny_args(shards, str(tmp_path), backend="nccl"), "needs CUDA")
    if not torch.cuda.is_available():
        fail(tiny_args(shards, str(tmp_path), device="cuda"), "CUDA is not available")
    fail(tiny_args(shards, str(tmp_path), resume="/no/such.pt"), "no such checkpoint")
    fail(tiny_args(shards, str(tmp_path), dtype="float16"), "choose float32 or bfloat16")


def test_training_learns_logs_and_is_deterministic(shards, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_args(shards, a, max_steps=30, val_every=10))
    run(tiny_args(shards, b, max_steps=30, val_every=10))
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == 30 and la == lb  # bit-identical, run to run
    events = read_metrics(a)
    first = events[0]
    assert set(first) >= {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec"}
    vals = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(vals) == 3 and vals[-1] < vals[0] < math.log(50257)
    assert la[29] < la[0] - 1.0
    assert os.path.exists(os.path.join(a, "ckpt_0000030.pt"))


def test_accumulation_equals_a_larger_micro_batch(shards, tmp_path):
    """2 micro steps of 4 sequences make the same step as 1 of 8 (fp32): the loss scaling is right."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_args(shards, a, micro_batch_size=4, total_batch_size=4 * 32 * 4, max_steps=5))
    run(tiny_args(shards, b, micro_batch_size=16, total_batch_size=4 * 32 * 4, max_steps=5))
    la, lb = train_losses(a), train_losses(b)
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)
    wa = torch.load(os.path.join(a, "ckpt_0000005.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, "ckpt_0000005.pt"), weights_only=True)["model"]
    for k in wa:
        # Adam divides by sqrt(v): rows of rare tokens, with gradients near 0, magnify rounding
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_chunked_and_full_logits_train_alike(shards, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(tiny_args(shards, a, chunked_loss=True, max_steps=5))
    run(tiny_args(shards, b, chunked_loss=False, max_steps=5))
    la, lb = train_losses(a), train_losses(b)
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-4)


def test_init_from_a_checkpoint_or_a_hugging_face_folder(shards, tmp_path):
    import convert_hf
    from model import GPTConfig
    a = str(tmp_path / "a")
    run(tiny_args(shards, a, max_steps=5))
    trained = torch.load(os.path.join(a, "ckpt_0000005.pt"), weights_only=True)
    hf_dir = convert_hf.export_hf(trained["model"], GPTConfig(**trained["model_config"]), str(tmp_path / "hf"))
    for source in (os.path.join(a, "ckpt_0000005.pt"), hf_dir):
        b = str(tmp_path / f"b{len(source)}")
        run(tiny_args(shards, b, max_steps=1, max_lr=0.0, min_lr=0.0, warmup_steps=0, init_from=source))
        start = torch.load(os.path.join(b, "ckpt_0000001.pt"), weights_only=True)["model"]  # lr 0: unchanged
        for k, v in trained["model"].items():
            assert torch.equal(start[k], v), (source, k)
    fail(tiny_args(shards, str(tmp_path / "c"), n_layer=3, init_from=hf_dir), "pick the matching --model")


def test_token_ids_outside_the_vocabulary_stop_the_run_naming_the_shard(tmp_path):
    # Every 20th token is 50304: without the loader's check, an IndexError deep in the embedding.
    import numpy as np
    from conftest import write_shards
    data = write_shards(str(tmp_path / "data"), n_train=1, train_tokens=4000, val_tokens=4000)
    tokens = np.load(os.path.join(data, "test_train_000001.npy"))
    tokens[::20] = 50304
    np.save(os.path.join(data, "test_train_000001.npy"), tokens)
    fail(tiny_args(data, str(tmp_path / "log"), max_steps=2, val_every=0), "test_train_000001.npy: token id 50304")
