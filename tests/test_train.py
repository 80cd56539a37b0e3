"""Training plumbing (mme/train.py): the learning-rate schedule, the parameter groups, CPU threads, the
stage scripts' command line."""
import os

import pytest
import torch

from mme import model as models, train
from mme.online.s3 import S3Error
from mme.train import command_line, cpu_threads, lr_at, param_groups


def test_layer_decay_and_no_decay_groups():
    clf = models.encoder("tiny", num_frames=4, img_size=32, num_classes=5)
    scale, decay = {}, {}
    for g in param_groups(clf, 0.05, layer_decay=0.75):
        for p in g["params"]:
            scale[id(p)], decay[id(p)] = g["lr_scale"], g["weight_decay"]
    named = dict(clf.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0 and scale[id(named["fc_norm.bias"])] == 1.0
    assert scale[id(named["blocks.11.mlp.fc1.weight"])] == pytest.approx(0.75)
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(0.75 ** 12)
    assert scale[id(named["patch_embed.proj.weight"])] == pytest.approx(0.75 ** 13)
    assert decay[id(named["blocks.3.attn.qkv.weight"])] == 0.05 and decay[id(named["blocks.3.attn.q_bias"])] == 0.0
    assert len(scale) == len(named)                                       # every parameter in one group
    assert {g["lr_scale"] for g in param_groups(clf, 0.05)} == {1.0}


def test_lr_warmup_then_cosine():
    r = {"warmup_epochs": 1, "epochs": 3}
    assert lr_at(0, r, 10, 1.0, 0.1) == 0.0 and lr_at(5, r, 10, 1.0, 0.1) == 0.5
    assert lr_at(10, r, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(20, r, 10, 1.0, 0.1) == pytest.approx(0.55)               # half way down the cosine
    assert lr_at(30, r, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_autocast_follows_the_recipe_precision():
    import torch

    from mme.train import autocast
    a = torch.ones(4, 4)
    cpu = torch.device("cpu")
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(cpu, precision):
            assert (a @ a).dtype == dtype, precision


@pytest.mark.parametrize("workers, env, want", [(1, None, 3), (0, None, 4), (64, None, 1), (1, "3", 4)])
def test_cpu_threads_leave_a_core_per_loader_worker(monkeypatch, workers, env, want):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))   # a 4-core machine
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:                                        # the user's OMP_NUM_THREADS: left as torch has it
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        torch.set_num_threads(4)                 # torch's default on that machine
        assert cpu_threads(torch.device("cpu"), workers) == torch.get_num_threads() == want
        torch.set_num_threads(4)
        assert cpu_threads(torch.device("cuda", 0), workers) == 4      # a GPU process: left alone
        torch.set_num_threads(2)                 # never more threads than torch's default
        assert cpu_threads(torch.device("cpu"), 0) == 2
    finally:
        torch.set_num_threads(before)


def test_command_line_help_and_one_line_errors(monkeypatch, capsys):
    """The stage scripts' __main__: --help prints our usage (exit 0); Ctrl-C and an S3 error end in one
    red line (exit 2) naming where to resume / what S3 said, never a traceback; other errors propagate."""
    def run(argv, fn):
        monkeypatch.setattr("sys.argv", ["script.py", *argv])
        with pytest.raises(SystemExit) as e:
            command_line(fn, lambda args: f"usage for {args}")
        out, err = capsys.readouterr()
        return e.value.code, out, err

    def boom(kind):
        raise {"ctrl-c": KeyboardInterrupt(), "s3": S3Error("s3://bucket/x.tar: AccessDenied (check AWS_ACCESS_KEY_ID)")}[kind]

    code, out, err = run(["--recipe", "r.yaml", "--help"], boom)
    assert code == 0 and out == "usage for ['--recipe', 'r.yaml', '--help']\n" and err == ""
    code, out, _ = run([], {"probe": boom})                                  # a script of commands, no arguments
    assert code == 0 and out.startswith("usage for []")
    monkeypatch.setattr(train, "last_step", 12)
    monkeypatch.setattr(train, "last_checkpoint", None)
    code, _, err = run(["--kind", "ctrl-c"], boom)
    said = "interrupted at step 12 before the first checkpoint: rerunning the same command starts from the beginning"
    assert code == 2 and err.strip() == f"error: {said}"
    code, _, err = run(["--kind", "s3"], boom)
    assert code == 2 and err.strip() == "error: s3://bucket/x.tar: AccessDenied (check AWS_ACCESS_KEY_ID)"
    monkeypatch.setenv("RANK", "1")                                          # other ranks exit without a word
    assert run(["--kind", "s3"], boom)[1:] == ("", "")
    monkeypatch.setattr("sys.argv", ["script.py", "--kind", "other"])
    with pytest.raises(KeyError):                                            # a bug is not an error line
        command_line(boom, lambda args: "")
