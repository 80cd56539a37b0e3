"""Pre-training recipes: plain dicts of settings, loaded from YAML and checked before anything starts.

This module owns the list of settings a pre-training run takes (`DEFAULTS`: every key, its default,
and the paper table it mirrors), what a valid value is, and the YAML form a run saves next to its
metrics. A recipe is a flat dict with exactly DEFAULTS' keys; nothing wraps it.

Overrides, later wins:   DEFAULTS  <-  the YAML file (recipes/*.yaml)  <-  keyword overrides

    r = load("recipes/ssv2.yaml")                      # the paper's SSv2 pre-training (Table 14)
    r = load("recipes/tiny.yaml", epochs=1)             # what `pretrain.py --recipe ... --epochs 1` does
    r, note = with_min_steps(r, steps_per_epoch)        # epochs raised to reach min_steps on a small dataset
    peak = lr(r, world_batch=r["batch_size"])           # base_lr * batch / 256 (Appendix D)
    (run_dir / "recipe.yaml").write_text(dump(r))       # load() reads it back to the same dict

Every mistake raises RecipeError (a ValueError) with one line naming where the value came from (the
file, "command line", or DEFAULTS), the key and what is wrong: an unknown key (with the closest known
one), a wrong type, or a value that would silently break training. Strings from the command line are
parsed to the key's type ('0.5', 'true', '0.9,0.95', 'none'), since shells pass strings.
"""
import copy
import difflib
import importlib.util
import math
import re
from pathlib import Path

import yaml

DEFAULTS = {
    # --- data (Table 14 and §4 "Implementation details"; the shards come from extract.py) ---
    "data_path": None,            # required: a shards folder from extract.py (its train split), a glob of .tar shards, an s3:// url, or a list of these
    "num_frames": 16,             # T input frames per clip (§4, Tables 14/15: 16-frame clips); must match the shards
    "sampling_rate": 4,           # stride s between input frames (§4: K400 4, SSv2 3; Table 10); must match the shards
    "input_size": 224,            # crop side in pixels (§4: 224x224); 16-px patches
    "crop_scales": [1.0, 0.875, 0.75, 0.66],  # MultiScaleCrop (Table 14 "augmentation"), fractions of the short side, as in the authors' code
    "flip": False,                # horizontal flip (Table 14: SSv2 no, K400 yes); the authors' code never flips
    "mask_type": "tube",          # Table 11: tube masking (or 'random', VideoMAE's other choice)
    "mask_ratio": 0.7,            # Table 11: 70% tube masking is best (90%: -1.4, 40%: -2.8)
    "target": "mme",              # Table 5: 'mme' (trajectories, ours), 'pixel' (VideoMAE), 'hog' (MaskFeat) baselines; 'none' for fine-tuning (labels only)
    "trajectory_length": 6,       # L raw frames tracked (Table 7: 6 best; the authors' script uses 4); must match the shards
    "interpolation": True,        # Table 6: predict the trajectory at every raw frame (True) or only at the input stride (False)
    "trajectory_density": "dense",  # Table 9: all K=4 trajectories of a patch ('dense'), merged into one by 'mean' or 'max', or 'mean+relative': the mean path and the K paths relative to it, two balanced parts (mme/online/targets.py)
    "patch_norm": "paper",        # Table 8: 'paper' standardises each target part over the K trajectories of a patch (+2.0); 'authors' their code's PatchStd (per step and coordinate across the K: the common motion removed); 'none' raw (true/false read as paper/none)
    "shape_target": True,         # Table 5: predict trajectory-aligned HOG (eq. 5) too; False = "Traj. w/o shape" (-0.6)
    "loss_balance": False,        # loss: each target part's MSE over its mean square in the batch, parts averaged (the authors' code averages the two parts' MSEs); False = eq. 1 as implemented, the MSE over all D values
    "balance_per_clip": False,    # loss_balance per clip instead of per batch (ours): each clip's parts over their rms in that clip, so a clip of slow motion (a turn, a scaling: < 1 px) counts as much as a fast one; measured at CPU scale: no gain (docs/results.md, learning depth)
    "loss_visible": 0.0,          # loss: weight of the same loss on the visible tokens (0 = the paper: masked tokens only); docs/results.md, "what makes it learn"
    "shuffle_frames": False,      # Fig. 3: shuffle the frame order within each clip before anything else (temporal information removed)
    "batch_size": 768,            # Table 14; clips per optimizer step summed over all ranks and accum_steps
    "num_workers": 8,             # loader processes per rank (not from the paper)
    "seed": 0,                    # each rank seeds with seed + rank (as VideoMAE)
    "test_num_crop": 3,           # evaluation: square crops of the short side spread along the long side (VideoMAE's 3-crop test), x every clip window in the shards
    "test_num_segment": None,     # evaluation: clip windows tested per video, spread evenly over those the shards hold (extract.py --views; VideoMAE: 5 K400, 2 SSv2); None: every one. The others still run, as padding
    # --- model (§4: ViT-B; Table 12: decoder) ---
    "model": "base",              # encoder ViT size, 16x16x2 tubelets: tiny | small | base | large (§4 uses base)
    "patch_embed": "linear",      # tubelet -> token: 'linear' (the paper's, VideoMAE's) or 'conv', a small CNN inside each tubelet, or 'conv_diff', the same CNN over the tubelet's mean frame and frame difference, or 'linear+conv_diff', both summed, or 'linear+conv_grad', that CNN also fed the normal flow (ours: mme/model.py PatchEmbed; docs/results.md)
    "depth": None,                # encoder blocks; None: the size's (12; large 24). Fewer for CPU-budget runs (recipes/learn_tiny.yaml)
    "decoder_depth": 1,           # Table 12: one joint decoder block is best (2 blocks: -0.7)
    "decoder_embed_dim": 192,     # decoder width (authors' code; not in the paper)
    "decoder_num_heads": 6,       # decoder heads (authors' code; not in the paper)
    "drop_path": 0.0,             # stochastic depth in pre-training (VideoMAE's default; Table 15's 0.1 is for fine-tuning)
    # --- optimisation (Table 14; AdamW, cosine decay after a linear warmup) ---
    "epochs": 800,                # Table 1/2: 800-epoch pre-training (Appendix D: 400 for the UCF101/HMDB51 transfer)
    "warmup_epochs": 40.0,        # Table 14 (a fraction of an epoch is fine: short runs)
    "min_steps": 0,               # at least this many optimizer steps: on a smaller dataset epochs (and warmup_epochs with them) are raised to reach it, said at the start; 0: epochs decide (not in the paper)
    "base_lr": 1.5e-4,            # Table 14; the peak lr is base_lr * batch_size / 256 (Appendix D), see lr()
    "min_lr": 1e-5,               # end of the cosine decay, scaled by batch_size / 256 like base_lr, as VideoMAE does: lr(r, b, "min_lr")
    "weight_decay": 0.05,         # Table 14
    "opt_betas": [0.9, 0.999],    # Table 14 prints 0.9, 0.999; the authors' scripts (and VideoMAE's) use 0.9, 0.95
    "clip_grad": None,            # max gradient norm; None: no clipping (not in Table 14; VideoMAE's default)
    "accum_steps": 1,             # gradient accumulation: batch_size is split over world size x accum_steps
    # --- fine-tuning and linear probing (finetune.py; Table 15, Table 4) ---
    "finetune": None,             # weights to start from: pretrain.py's encoder.pth, a checkpoint folder of it (runs/NAME/checkpoints/step_N) or a released VideoMAE/MME checkpoint; None: random init
    "num_classes": None,          # classifier outputs (SSv2 174, K400 400, UCF101 101, HMDB51 51); required by finetune.py
    "eval_data_path": None,       # shards to evaluate on; None: the val split of data_path (a shards folder with manifest.json)
    "layer_decay": 0.75,          # Table 15: layer-wise lr decay (full fine-tuning)
    "pool": "mean",               # the classifier's head (full, eval): 'mean' (VideoMAE's, the paper's: mean of the tokens -> fc_norm -> Linear) or 'attentive' (ours: a query cross-attending to every token, told its position; mme/model.py AttentiveHead); export needs mean
    "head_init": "random",        # full: the head starts 'random' (VideoMAE's) or 'probe' (LP-FT, Kumar et al. 2022: fitted first on the loaded encoder's frozen features of the training clips, as finetune.py frozen fits its probe; then every layer trains)
    "smoothing": 0.1,             # Table 15: label smoothing (full fine-tuning)
    "mixup": 0.8,                 # Table 15: mixup alpha (full fine-tuning; 0 = off)
    "cutmix": 1.0,                # Table 15: cutmix alpha (full fine-tuning; 0 = off)
    "rand_aug": None,             # Table 15 "RandAug (9, 0.5)": [ops, magnitude, magnitude std], e.g. [2, 9, 0.5]; None: off
    "repeated_aug": 1,            # Table 15 "repeated sampling": differently augmented clips per sample in an epoch (VideoMAE: 2)
    "eval_every": 0,              # validate every this many epochs while fine-tuning (and at the end), keeping best.pth by val top-1 (VideoMAE: every epoch); 0: only the final evaluation
    # --- runtime ---
    "output_dir": "runs",         # a run writes to output_dir/name/
    "wandb": None,                # a Weights & Biases project to log the scalars to as well (pip install wandb; credentials: wandb's WANDB_API_KEY or `wandb login`); None: TensorBoard only
    "name": None,                 # run name; None: the recipe file's name ("recipes/ssv2.yaml" -> "ssv2")
    "save_every": 1000,           # optimizer steps between checkpoints (one is also written at the end)
    "keep_checkpoints": 2,        # the newest checkpoints a run keeps (older ones are removed); 0: all, e.g. to read the encoder at each (finetune.py --finetune RUN/checkpoints/step_N)
    "log_every": 20,              # optimizer steps between progress lines in log.txt (and on stderr when it is not a terminal)
    "log_seconds": 60.0,          # ... and at least one progress line this often (seconds), however slow the steps
    "device": "auto",             # 'auto' (cuda if present, else cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
    # Added: 800 epochs take days, so a run must survive restarts and use mixed precision.
    "resume": True,               # continue from the last checkpoint in output_dir/name if there is one (VideoMAE's auto_resume)
    "resume_changes": None,       # keys this resume may change from the run's saved recipe.yaml, e.g. base_lr,clip_grad after a non-finite loss (other changes are refused)
    "precision": "auto",          # 'auto' (bf16 autocast on GPUs that have it, else fp32) | 'fp32' | 'bf16' (VideoMAE: fp16 AMP; bf16 needs no loss scaling)
}

# Types that cannot be read off the default (None, or more than one type). A tuple lists the
# alternatives; [t] is a list of t. Every other key takes the type of its default.
TYPES = {
    "data_path": (str, [str]),
    "clip_grad": float,
    "depth": int,
    "test_num_segment": int,
    "wandb": str,
    "name": str,
    "finetune": str,
    "num_classes": int,
    "eval_data_path": (str, [str]),
    "rand_aug": [float],
    "resume_changes": [str],
}

MODELS = ("tiny", "small", "base", "large")    # ViT-T/S/B/L: widths 192/384/768/1024
CHOICES = {
    "mask_type": ("tube", "random"),
    "target": ("mme", "pixel", "hog", "none"),
    "trajectory_density": ("dense", "mean", "max", "mean+relative"),
    "patch_norm": ("paper", "authors", "none"),
    "patch_embed": ("linear", "conv", "conv_diff", "linear+conv_diff", "linear+conv_grad"),
    "pool": ("mean", "attentive"),
    "head_init": ("random", "probe"),
    "model": MODELS,
    "precision": ("auto", "fp32", "bf16"),
}


class RecipeError(ValueError):
    """A recipe that must not start: the message is one line, 'where: what is wrong'."""


def load(path=None, **overrides):
    """DEFAULTS <- the YAML file at path <- overrides (e.g. from the command line: fire passes --epochs 1
    as overrides={'epochs': 1}). Returns a new plain dict with exactly DEFAULTS' keys; `name` None
    becomes the file's stem. Raises RecipeError with a one-line message on an unknown key (with the
    closest known key), a wrong type, or a value that would break training."""
    recipe, where = copy.deepcopy(DEFAULTS), dict.fromkeys(DEFAULTS, "DEFAULTS")
    layers = [(str(path), _read(path), False)] if path is not None else []
    layers.append(("command line", overrides, True))
    for source, values, cli in layers:
        for key, value in values.items():
            if key not in DEFAULTS:
                close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else " (the keys are in mme/recipe.py DEFAULTS)"
                raise RecipeError(f"{source}: unknown key {key!r}{hint}")
            recipe[key] = _typed(source, key, value, cli)
            where[key] = source
    if recipe["name"] is None and path is not None:
        recipe["name"] = Path(path).stem
        where["name"] = str(path)
    _check(recipe, where, str(path) if path is not None else "command line")
    return recipe


def keys_help(width=None):
    """Every key, grouped as in DEFAULTS: `--key TYPE = default` and the comment DEFAULTS has for it in
    this file (the paper table it mirrors, what it does), for the scripts' --help."""
    import shutil
    import textwrap

    width = width or max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    source = Path(__file__).read_text()
    body = source[source.index("DEFAULTS = {\n") + len("DEFAULTS = {\n"):source.index("\n}\n", source.index("DEFAULTS = {"))]
    out = []
    for line in body.splitlines():
        section = re.fullmatch(r"\s*# --- (.*) ---\s*", line)
        entry = re.fullmatch(r'\s*"(\w+)":\s*(.*?),\s*#\s*(.*)', line)
        if section:
            title, _, why = section.group(1).partition(" (")
            out += ["", f"{title}" + (f" ({why}" if why else "") + ":"]
        elif entry and entry.group(1) in DEFAULTS:
            key, literal, comment = entry.groups()
            if comment.startswith("... "):
                comment = comment[4:]
            out.append(f"  --{key} {_type_name(key)} = {_show(literal)}")
            out += textwrap.wrap(comment, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        elif line.strip().startswith("#"):
            out += textwrap.wrap(line.strip().lstrip("# "), width, initial_indent="  (", subsequent_indent="   ")
            out[-1] += ")"
    return "\n".join(out).strip("\n")


def _type_name(key):
    """What a value of `key` looks like on the command line: FLOAT, INT, true|false, tube|random, FLOAT,FLOAT..."""
    if key in CHOICES:
        name = "|".join(CHOICES[key])
    else:
        def one(spec):
            if isinstance(spec, tuple) and len(spec) == 2 and spec[1] == [spec[0]]:
                return f"{one(spec[0])}[,{one(spec[0])}...]"
            if isinstance(spec, tuple):
                return " or ".join(one(x) for x in spec)
            if isinstance(spec, list):
                return f"{one(spec[0])},{one(spec[0])},..."
            return {bool: "true|false", int: "INT", float: "FLOAT", str: "TEXT"}[spec]
        name = one(_spec(key))
    return name + ("|null" if DEFAULTS[key] is None else "")


def _show(literal):
    """A default as written in DEFAULTS (1.5e-4, not 0.00015), in the command line's spelling."""
    literal = {"None": "null", "True": "true", "False": "false"}.get(literal, literal)
    return re.sub(r"\s+", "", literal.strip("[]")).replace('"', "") if literal.startswith("[") else literal.strip('"')


def dump(recipe):
    """YAML text of a recipe (saved next to a run's metrics); load() of it gives the recipe back."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=None, width=1000)


def with_min_steps(recipe, steps_per_epoch):
    """(recipe, note): the recipe with epochs raised so that the schedule has at least min_steps optimizer
    steps (warmup_epochs scaled by the same factor, so the warm-up keeps its share), and the line that says
    so (None when epochs already reach it). A copy; the argument is left as it is."""
    r = dict(recipe)
    planned = r["epochs"] * steps_per_epoch
    if not r["min_steps"] or planned >= r["min_steps"]:
        return r, None
    epochs = -(-r["min_steps"] // steps_per_epoch)                      # ceil: whole epochs
    r["warmup_epochs"] = r["warmup_epochs"] * epochs / r["epochs"]
    r["epochs"] = epochs
    return r, (f"{steps_per_epoch} steps an epoch: epochs raised from {recipe['epochs']} to {epochs} "
               f"({epochs * steps_per_epoch} steps) to reach min_steps {r['min_steps']}, warm-up {r['warmup_epochs']:g} epochs")


def lr(recipe, world_batch, key="base_lr"):
    """base_lr * world_batch / 256: the peak learning rate (Appendix D's linear scaling rule).
    key='min_lr' scales the end of the cosine decay the same way (as VideoMAE does)."""
    return recipe[key] * world_batch / 256


# --- reading -----------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 and 1.5e4 as floats (PyYAML's YAML 1.1 rules need '1.0e-5')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _read(path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a mapping of 'key: value' lines, got {type(data).__name__}")
    seen = set()
    for k, _ in node.value:                         # PyYAML keeps the last of two equal keys silently
        if k.value in seen:
            raise RecipeError(f"{path}: key {k.value!r} appears twice (again at line {k.start_mark.line + 1})")
        seen.add(k.value)
    return data


# --- types -------------------------------------------------------------------------------------

def _spec(key):
    if key in TYPES:
        return TYPES[key]
    d = DEFAULTS[key]
    return [type(d[0])] if isinstance(d, list) else type(d)


def _describe(spec):
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return f"a list of {spec[0].__name__}"
    return {int: "an int"}.get(spec, f"a {spec.__name__}")


def cli_bool(value, name):
    """A command's own true/false flag (not a recipe key) as fire hands it over: fire reads `--attentive false`
    as the string 'false', which is truthy. -> bool, or ValueError naming the flag."""
    try:
        return _convert(value, bool, True)
    except ValueError:
        raise ValueError(f"--{name}: true or false, not {value!r}") from None


def cli_count(value, name):
    """A command's own positive whole-number flag (not a recipe key), e.g. --attentive_steps 200 -> int, or
    ValueError naming the flag."""
    try:
        count = _convert(value, int, True)
    except ValueError:
        count = 0
    if isinstance(count, bool) or count < 1:
        raise ValueError(f"--{name}: a whole number above 0, not {value!r}")
    return count


def _convert(value, spec, cli):
    """value as `spec`, or raise ValueError. Ints pass as floats; command-line strings are parsed."""
    if isinstance(spec, tuple):
        for s in spec:
            try:
                return _convert(value, s, cli)
            except ValueError:
                pass
        raise ValueError
    if isinstance(spec, list):
        if cli and isinstance(value, str):              # '0.9,0.95' or '[0.9, 0.95]'
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        if cli and isinstance(value, (int, float)) and not isinstance(value, bool):   # fire reads --crop_scales 1.0 as a float
            value = [value]
        if not isinstance(value, (list, tuple)):        # fire turns 0.9,0.95 into a tuple
            raise ValueError
        return [_convert(v, spec[0], cli) for v in value]
    if spec is bool:
        if isinstance(value, bool):
            return value
        if cli and isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise ValueError
    if spec is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if cli and isinstance(value, str):
            return int(value.strip())                   # ValueError if it is not one
        raise ValueError
    if spec is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            x = float(value)
        elif cli and isinstance(value, str):
            x = float(value.strip())
        else:
            raise ValueError
        if not math.isfinite(x):
            raise ValueError
        return x
    if spec is str:
        if isinstance(value, str):
            return value
        if cli and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)                           # fire reads --name 7 as the int 7
        raise ValueError
    raise TypeError(spec)


def _typed(source, key, value, cli):
    if key == "patch_norm" and isinstance(value, bool):          # recipes written before 'authors' existed
        return "paper" if value else "none"
    if key == "patch_norm" and cli and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return "paper" if value.strip().lower() == "true" else "none"
    nullable = DEFAULTS[key] is None
    if nullable and (value is None or (cli and isinstance(value, str) and value.strip().lower() in ("none", "null", "~"))):
        return None
    spec = _spec(key)
    try:
        return _convert(value, spec, cli)
    except ValueError:
        want = _describe(spec) + (" or null" if nullable else "")
        raise RecipeError(f"{source}: {key} must be {want}, got {value!r} ({type(value).__name__})".replace("\n", " ")) from None


# --- values ------------------------------------------------------------------------------------

def _check(r, where, home):
    """Values that would break training (or silently train something else)."""
    def bad(keys, what):
        keys = keys.split()
        sources = list(dict.fromkeys(where[k] for k in keys))
        shown = ", ".join(f"{k}={r[k]!r}" for k in keys)
        raise RecipeError(f"{' + '.join(sources)}: {what} (got {shown})")

    if r["data_path"] is None:
        raise RecipeError(f"{home}: data_path is required (a shards folder from extract.py, a glob of .tar shards, or an s3:// url)")
    paths = r["data_path"] if isinstance(r["data_path"], list) else [r["data_path"]]
    if not paths or not all(p.strip() for p in paths):
        bad("data_path", "data_path must be a non-empty path, glob or url")
    for key, choices in CHOICES.items():
        if r[key] not in choices:
            close = difflib.get_close_matches(str(r[key]), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            bad(key, f"{key} must be one of {', '.join(choices)}{hint}")
    if not 0 <= r["mask_ratio"] < 1:
        bad("mask_ratio", "mask_ratio must be in [0, 1)")
    if r["num_frames"] < 2 or r["num_frames"] % 2:
        bad("num_frames", "num_frames must be even and >= 2 (tubelets of 2 frames)")
    if r["input_size"] < 16 or r["input_size"] % 16:
        bad("input_size", "input_size must be a positive multiple of 16 (the patch size)")
    if not r["crop_scales"] or not all(0 < s <= 1 for s in r["crop_scales"]):
        bad("crop_scales", "crop_scales must be a non-empty list of fractions in (0, 1]")
    positive = ("sampling_rate trajectory_length batch_size epochs decoder_depth decoder_embed_dim "
                "decoder_num_heads accum_steps save_every repeated_aug test_num_crop log_every")
    if r["keep_checkpoints"] < 0:
        bad("keep_checkpoints", "keep_checkpoints must be >= 0 (0: keep every checkpoint)")
    if r["eval_every"] < 0:
        bad("eval_every", "eval_every must be >= 0 (0: evaluate only at the end)")
    if r["wandb"] and importlib.util.find_spec("wandb") is None:      # every rank stops here, before any work
        bad("wandb", f"wandb {r['wandb']!r}: the wandb package is not installed (pip install wandb), or leave wandb unset")
    if r["test_num_segment"] is not None and r["test_num_segment"] < 1:
        bad("test_num_segment", "test_num_segment must be a positive number of clip windows (or none: every one)")
    if r["depth"] is not None and r["depth"] < 1:
        bad("depth", "depth must be a positive number of blocks (or none: the model size's)")
    if r["patch_norm"] == "authors" and r["target"] == "mme" and r["trajectory_density"] != "dense":
        bad("patch_norm trajectory_density", "patch_norm 'authors' standardises across the K trajectories of a patch, "
            "so it needs trajectory_density 'dense' (one merged trajectory would be all zeros)")
    if r["balance_per_clip"] and not r["loss_balance"]:
        bad("balance_per_clip loss_balance", "balance_per_clip balances the target's parts per clip: it needs loss_balance true")
    if r["loss_visible"] < 0:
        bad("loss_visible", "loss_visible must be >= 0 (0: the loss on masked tokens only, as the paper)")
    for key in positive.split():
        if r[key] < 1:
            bad(key, f"{key} must be positive")
    if not r["interpolation"] and r["trajectory_length"] < r["sampling_rate"]:
        bad("interpolation trajectory_length sampling_rate",
            "without interpolation the target keeps trajectory points every sampling_rate raw frames, "
            "so trajectory_length must be >= sampling_rate")
    if r["decoder_embed_dim"] % r["decoder_num_heads"]:
        bad("decoder_embed_dim decoder_num_heads", "decoder_embed_dim must be divisible by decoder_num_heads")
    if not 0 <= r["drop_path"] < 1:
        bad("drop_path", "drop_path must be in [0, 1)")
    if r["log_seconds"] <= 0:
        bad("log_seconds", "log_seconds must be positive")
    if r["num_workers"] < 0:
        bad("num_workers", "num_workers must be >= 0")
    unknown = [k for k in r["resume_changes"] or [] if k not in DEFAULTS]
    if unknown:
        bad("resume_changes", f"resume_changes names no recipe key {unknown[0]!r}")
    if r["min_steps"] < 0:
        bad("min_steps", "min_steps must be >= 0 (0: the epochs decide the number of steps)")
    if not 0 <= r["warmup_epochs"] <= r["epochs"]:
        bad("warmup_epochs epochs", "warmup_epochs must be in [0, epochs]")
    if r["batch_size"] % r["accum_steps"]:
        bad("batch_size accum_steps", "batch_size (clips per optimizer step) must be divisible by accum_steps")
    if r["base_lr"] <= 0:
        bad("base_lr", "base_lr must be positive")
    if not 0 <= r["min_lr"] <= r["base_lr"]:
        bad("min_lr base_lr", "min_lr must be in [0, base_lr] (the cosine decays from base_lr to min_lr)")
    if r["weight_decay"] < 0:
        bad("weight_decay", "weight_decay must be >= 0")
    if len(r["opt_betas"]) != 2 or not all(0 <= b < 1 for b in r["opt_betas"]):
        bad("opt_betas", "opt_betas must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if r["clip_grad"] is not None and r["clip_grad"] <= 0:
        bad("clip_grad", "clip_grad must be positive, or null for no clipping")
    if r["rand_aug"] is not None and (len(r["rand_aug"]) != 3 or r["rand_aug"][0] != int(r["rand_aug"][0])
                                      or not 0 <= r["rand_aug"][1] <= 10 or r["rand_aug"][2] < 0):
        bad("rand_aug", "rand_aug must be [ops, magnitude 0..10, magnitude std >= 0], e.g. [2, 9, 0.5], or null")
    if r["num_classes"] is not None and r["num_classes"] < 1:
        bad("num_classes", "num_classes must be positive")
    if not 0 < r["layer_decay"] <= 1 or not 0 <= r["smoothing"] < 1 or r["mixup"] < 0 or r["cutmix"] < 0:
        bad("layer_decay smoothing mixup cutmix", "need 0 < layer_decay <= 1, 0 <= smoothing < 1, mixup and cutmix >= 0")
    if not r["output_dir"].strip():
        bad("output_dir", "output_dir must not be empty")
    if r["name"] is not None and (not r["name"].strip() or r["name"] in (".", "..") or re.search(r"[/\\]", r["name"])):
        bad("name", "name must be a plain folder name (no '/')")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", r["device"]):
        bad("device", "device must be auto, cpu, cuda, cuda:N or mps")
