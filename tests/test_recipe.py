"""Recipes: the shipped files load, overrides win, every mistake is a one-line RecipeError, --help lists every key.

What a recipe file says is not restated here: the file is the one place to change it."""
import re
from pathlib import Path

import pytest
import yaml

from mme import recipe
from mme.recipe import DEFAULTS, RecipeError, dump, load, lr, with_min_steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)                 # so messages name 'recipes/ssv2.yaml' as a user would type it


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error(*args, **kwargs):
    with pytest.raises(RecipeError) as e:
        load(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


# --- the shipped recipes ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
def test_recipes_load_with_exactly_the_known_keys(name):
    r = load(f"recipes/{name}.yaml")
    assert list(r) == list(DEFAULTS)
    assert r["name"] == name                            # None -> the file's stem
    raw = yaml.safe_load(Path(f"recipes/{name}.yaml").read_text())
    assert set(raw) <= set(DEFAULTS)


def test_load_without_a_file_and_does_not_share_defaults():
    r = load(data_path="shards/x/")
    assert r["name"] is None and r["data_path"] == "shards/x/"
    r["crop_scales"].append(0.5)
    r["opt_betas"][1] = 0.95
    assert DEFAULTS["crop_scales"] == [1.0, 0.875, 0.75, 0.66] and DEFAULTS["opt_betas"] == [0.9, 0.999]
    assert load(data_path="shards/x/")["crop_scales"] == [1.0, 0.875, 0.75, 0.66]


def test_command_line_strings_parse():
    r = load("recipes/tiny.yaml", mask_ratio="0.5", epochs="2", flip="true", patch_norm="False",
             opt_betas="0.9,0.95", crop_scales="[1, 0.5]", clip_grad="3", base_lr="1e-3", name=7)
    assert r["mask_ratio"] == 0.5 and isinstance(r["mask_ratio"], float)
    assert r["epochs"] == 2 and isinstance(r["epochs"], int)
    assert r["flip"] is True and r["patch_norm"] == "none"
    assert r["opt_betas"] == [0.9, 0.95] and r["crop_scales"] == [1.0, 0.5]
    assert r["clip_grad"] == 3.0 and r["base_lr"] == 1e-3 and r["name"] == "7"
    assert load("recipes/tiny.yaml", clip_grad="none")["clip_grad"] is None
    assert load("recipes/tiny.yaml", opt_betas=(0.9, 0.95))["opt_betas"] == [0.9, 0.95]   # fire's tuple


def test_ints_pass_as_floats_and_floats_without_a_dot_parse(tmp_path):
    p = write(tmp_path, "data_path: s/\nmin_lr: 1e-6\nbase_lr: 2E-4\nclip_grad: 1\nweight_decay: 0\n")
    r = load(p)
    assert r["min_lr"] == 1e-6 and r["base_lr"] == 2e-4        # PyYAML alone reads '1e-6' as a string
    assert r["clip_grad"] == 1.0 and isinstance(r["clip_grad"], float) and r["weight_decay"] == 0.0


def test_data_path_may_be_a_list():
    assert load(data_path=["shards/a/", "s3://b/{000..009}.tar"])["data_path"] == ["shards/a/", "s3://b/{000..009}.tar"]


# --- errors -------------------------------------------------------------------------------------

def test_unknown_key_in_the_file_suggests_the_close_one(tmp_path):
    text = Path("recipes/ssv2.yaml").read_text().replace("mask_ratio:", "mask_ratoi:")
    p = write(tmp_path, text, "ssv2.yaml")
    assert error(p) == f"{p}: unknown key 'mask_ratoi' (did you mean 'mask_ratio'?)"


def test_unknown_key_on_the_command_line():
    assert error("recipes/ssv2.yaml", epoch=1) == "command line: unknown key 'epoch' (did you mean 'epochs'?)"
    assert "unknown key 'zzz'" in error("recipes/ssv2.yaml", zzz=1)


def test_wrong_types(tmp_path):
    p = write(tmp_path, "data_path: s/\nmask_ratio: high\n")
    assert error(p) == f"{p}: mask_ratio must be a float, got 'high' (str)"
    assert error("recipes/ssv2.yaml", epochs="ten") == "command line: epochs must be an int, got 'ten' (str)"
    assert error("recipes/ssv2.yaml", epochs=2.5).startswith("command line: epochs must be an int, got 2.5")
    assert error("recipes/ssv2.yaml", flip="maybe").startswith("command line: flip must be a bool")
    assert error("recipes/ssv2.yaml", clip_grad="big") == "command line: clip_grad must be a float or null, got 'big' (str)"
    assert "opt_betas must be a list of float" in error("recipes/ssv2.yaml", opt_betas=["a", "b"])
    assert "opt_betas must be two numbers" in error("recipes/ssv2.yaml", opt_betas=0.9)       # one number: a list of one
    assert "data_path must be a str or a list of str" in error(data_path={"a": 1})


def test_file_values_are_not_parsed_from_strings(tmp_path):
    """A quoted value in a file is a string: only the command line gets the benefit of the doubt."""
    assert "mask_ratio must be a float" in error(write(tmp_path, "data_path: s/\nmask_ratio: '0.5'\n"))
    assert "flip must be a bool, got 1 (int)" in error(write(tmp_path, "data_path: s/\nflip: 1\n"))
    assert "epochs must be an int, got True (bool)" in error(write(tmp_path, "data_path: s/\nepochs: yes\n"))


@pytest.mark.parametrize("override, words", [
    (dict(mask_ratio=1.0), "mask_ratio must be in [0, 1)"),
    (dict(mask_ratio=-0.1), "mask_ratio must be in [0, 1)"),
    (dict(loss_visible=-1), "loss_visible must be >= 0"),
    (dict(balance_per_clip=True, loss_balance=False), "it needs loss_balance true"),
    (dict(target="flow"), "target must be one of mme, pixel, hog"),
    (dict(target="hogg"), "did you mean 'hog'?"),
    (dict(mask_type="cube"), "mask_type must be one of tube, random"),
    (dict(model="huge"), "model must be one of tiny, small, base, large"),
    (dict(trajectory_density="sparse"), "trajectory_density must be one of dense, mean, max"),
    (dict(num_frames=15), "num_frames must be even"),
    (dict(input_size=200), "input_size must be a positive multiple of 16"),
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(epochs=0, warmup_epochs=0), "epochs must be positive"),
    (dict(epochs=10), "warmup_epochs must be in [0, epochs]"),
    (dict(min_lr=1e-3), "min_lr must be in [0, base_lr]"),
    (dict(opt_betas=[0.9]), "opt_betas must be two numbers"),
    (dict(opt_betas=[0.9, 1.5]), "opt_betas must be two numbers"),
    (dict(crop_scales=[1.0, 1.2]), "crop_scales must be a non-empty list of fractions in (0, 1]"),
    (dict(decoder_embed_dim=100), "decoder_embed_dim must be divisible by decoder_num_heads"),
    (dict(accum_steps=5), "batch_size (clips per optimizer step) must be divisible by accum_steps"),
    (dict(clip_grad=0), "clip_grad must be positive"),
    (dict(device="gpu"), "device must be"),
    (dict(name="a/b"), "name must be a plain folder name"),
    (dict(interpolation=False, trajectory_length=2), "trajectory_length must be >= sampling_rate"),
    (dict(base_lr="nan"), "base_lr must be a float"),
])
def test_bad_values(override, words):
    msg = error("recipes/ssv2.yaml", **override)
    assert words in msg, msg
    key = next(iter(override))
    assert key in msg and msg.split(":")[0] in ("command line", "recipes/ssv2.yaml + command line",
                                                 "command line + recipes/ssv2.yaml")


def test_value_errors_name_where_the_value_came_from(tmp_path):
    p = write(tmp_path, "data_path: s/\nmask_ratio: 0.95\n")
    assert load(p)["mask_ratio"] == 0.95
    p = write(tmp_path, "data_path: s/\nmask_ratio: 1.5\n")
    assert error(p) == f"{p}: mask_ratio must be in [0, 1) (got mask_ratio=1.5)"
    # warmup_epochs comes from DEFAULTS, epochs (fewer) from the file: both are named
    warmup, epochs = DEFAULTS["warmup_epochs"], int(DEFAULTS["warmup_epochs"]) - 1
    p = write(tmp_path, f"data_path: s/\nepochs: {epochs}\n")
    assert error(p) == f"DEFAULTS + {p}: warmup_epochs must be in [0, epochs] (got warmup_epochs={float(warmup)}, epochs={epochs})"


def test_the_valid_edges_pass():
    epochs = load("recipes/ssv2.yaml")["epochs"]
    r = load("recipes/ssv2.yaml", mask_ratio=0, warmup_epochs=epochs, min_lr=0, interpolation=False, device="cuda:1")
    assert r["mask_ratio"] == 0.0 and r["warmup_epochs"] == epochs and r["min_lr"] == 0 and r["device"] == "cuda:1"


def test_data_path_is_required(tmp_path):
    p = write(tmp_path, "epochs: 1\nwarmup_epochs: 0\n")
    assert error(p).startswith(f"{p}: data_path is required")
    assert error().startswith("command line: data_path is required")


def test_broken_files(tmp_path):
    assert error(tmp_path / "nope.yaml").startswith(f"{tmp_path / 'nope.yaml'}: cannot read")
    assert error(write(tmp_path, "data_path: [s/\n")).startswith(f"{tmp_path / 'r.yaml'}: not valid YAML at line")
    assert "must be a mapping" in error(write(tmp_path, "- 1\n- 2\n"))
    msg = error(write(tmp_path, "data_path: s/\nmask_ratio: 0.7\nepochs: 3\nmask_ratio: 0.9\n"))
    assert msg == f"{tmp_path / 'r.yaml'}: key 'mask_ratio' appears twice (again at line 4)"
    assert error(write(tmp_path, "")).endswith("data_path is required (a shards folder from extract.py, "
                                               "a glob of .tar shards, or an s3:// url)")


# --- dump and lr --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ssv2", "k400", "tiny"])
def test_dump_load_round_trip(tmp_path, name):
    r = load(f"recipes/{name}.yaml", clip_grad=1.5, min_lr=1e-6)
    p = write(tmp_path, dump(r), "recipe.yaml")
    back = load(p)
    assert list(yaml.safe_load(dump(r))) == list(DEFAULTS)      # saved in DEFAULTS' order, grouped as there
    assert back == r and list(back) == list(r)
    assert back["name"] == name                     # not renamed after the saved file
    for k in r:
        assert type(back[k]) is type(r[k]), k


def test_lr_scales_with_the_world_batch():
    r = load(data_path="s/", base_lr=1.5e-4, min_lr=1e-5)
    assert lr(r, 256) == pytest.approx(1.5e-4)
    assert lr(r, 768) == pytest.approx(4.5e-4)
    assert lr(r, 64) == pytest.approx(3.75e-5)
    assert lr(r, 768, "min_lr") == pytest.approx(3e-5)
    assert lr(load(data_path="s/", base_lr=3e-4), 512) == pytest.approx(6e-4)


def test_module_is_plain_data():
    assert type(DEFAULTS) is dict and all(DEFAULTS[k] is None for k in recipe.TYPES)   # TYPES: only for None defaults
    assert all(v is None or type(v) in (int, float, bool, str, list) for v in DEFAULTS.values())


def test_help_lists_every_key_with_type_default_and_table():
    """Issue #11: pretrain.py --help and finetune.py probe --help list every recipe key (type, default, the
    paper table), grouped as in DEFAULTS, without fire's noise."""
    import subprocess
    import sys
    for cmd in (["pretrain.py", "--help"], ["finetune.py", "probe", "--help"], ["finetune.py", "frozen", "-h"]):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Showing help" not in r.stderr + r.stdout and "Type:" not in r.stdout, r.stderr
        text = r.stdout
        assert re.search(r"^  --mask_ratio FLOAT = 0\.7\n +Table 11: 70% tube masking", text, re.M), text
        assert "--base_lr FLOAT = 1.5e-4" in text and "--model tiny|small|base|large = base" in text
        assert "--clip_grad FLOAT|null = null" in text and "--opt_betas FLOAT,FLOAT,... = 0.9,0.999" in text
        for key in DEFAULTS:
            assert re.search(rf"^  --{key} ", text, re.M), f"{cmd}: --help does not list {key}"
        assert text.index("model (§4") < text.index("--decoder_depth") < text.index("optimisation (")   # DEFAULTS' groups
    assert "knn_k" in text
    top = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and all(f"  {c} " in top.stdout for c in ("probe", "full", "eval", "frozen"))


def test_min_steps_raises_epochs_on_a_small_dataset():
    r = load(None, data_path="x", epochs=8, warmup_epochs=0.8, min_steps=2000)
    raised, note = with_min_steps(r, 63)                   # 500 clips at batch 8: 63 steps an epoch
    assert raised["epochs"] == 32 and raised["epochs"] * 63 >= 2000 and raised["warmup_epochs"] == pytest.approx(3.2)
    assert note == "63 steps an epoch: epochs raised from 8 to 32 (2016 steps) to reach min_steps 2000, warm-up 3.2 epochs"
    assert r["epochs"] == 8                                 # the argument is left as it is
    assert with_min_steps(r, 250) == (r, None)              # 2,000 clips: the epochs already reach it
    assert with_min_steps(load(None, data_path="x", epochs=8, warmup_epochs=1), 63)[1] is None   # min_steps 0: epochs decide
    with pytest.raises(RecipeError, match="min_steps must be >= 0"):
        load(None, data_path="x", min_steps=-1)


def test_a_one_element_list_from_the_command_line():
    """fire reads `--crop_scales 1.0` as the float 1.0: a list key takes it as a one-element list."""
    assert load(None, data_path="x", crop_scales=1.0)["crop_scales"] == [1.0]
    with pytest.raises(RecipeError, match="crop_scales"):
        recipe._typed("recipes/x.yaml", "crop_scales", 1.0, cli=False)             # a file must write a list


def test_command_flags_read_false_as_false():
    """fire hands `--attentive false` over as the string 'false', which Python reads as true."""
    assert [recipe.cli_bool(v, "attentive") for v in ("false", "False", "off", False, "true", True)] == \
        [False, False, False, False, True, True]
    with pytest.raises(ValueError, match="--camera: true or false, not 'maybe'"):
        recipe.cli_bool("maybe", "camera")
    assert [recipe.cli_count(v, "attentive_steps") for v in ("200", 200, 1)] == [200, 200, 1]
    for bad in ("0", "-5", "2.5", "many", True):
        with pytest.raises(ValueError, match=f"--attentive_steps: a whole number above 0, not {bad!r}"):
            recipe.cli_count(bad, "attentive_steps")
