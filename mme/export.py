"""Weights in the formats other tools load: Hugging Face transformers' VideoMAE (a folder with config.json and
model.safetensors) and plain safetensors beside a .pth. Our encoder is the VideoMAE layout (mme.model), so an
export is a key mapping plus a config; transformers is never imported here (it is a test dependency).

    to_hf("runs/ft/model.pth", "out/")      # -> VideoMAEForVideoClassification.from_pretrained("out/")
    to_hf("runs/pre/encoder.pth", "out/")   # -> VideoMAEModel.from_pretrained("out/") (recipe.yaml read beside it)
    safetensors_beside("runs/ft/model.pth") # -> runs/ft/model.safetensors (the state dict, no pickle)

The key mapping (ours -> transformers):
    patch_embed.proj.*             -> videomae.embeddings.patch_embeddings.projection.*
    blocks.i.attn.qkv.weight       -> ...layer.i.attention.attention.{query,key,value}.weight (split in 3)
    blocks.i.attn.{q_bias,v_bias}  -> ...layer.i.attention.attention.{query,value}.bias (the key has none)
    blocks.i.attn.proj.*           -> ...layer.i.attention.output.dense.*
    blocks.i.norm1.* / norm2.*     -> ...layer.i.layernorm_before.* / layernorm_after.*
    blocks.i.mlp.fc1.* / fc2.*     -> ...layer.i.intermediate.dense.* / output.dense.*
    fc_norm.*, head.*              -> fc_norm.*, classifier.*  (the classifier: use_mean_pooling)
    norm.*                         -> layernorm.*               (the encoder: use_mean_pooling false)
Both use the same fixed sinusoid position table (VideoMAE's), GELU, LayerNorm eps 1e-6, 16 x 16 x 2 tubelets.
"""
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import yaml

from mme import model as models


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked: one line."""


def hf_state_dict(sd, depth, classifier):
    """Our backbone state dict (released layout) -> transformers' VideoMAE keys (the module docstring's table)."""
    pre = "videomae." if classifier else ""
    out = {f"{pre}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           f"{pre}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"{pre}encoder.layer.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        out.update({h + "attention.attention.query.weight": q, h + "attention.attention.key.weight": k,
                    h + "attention.attention.value.weight": v,
                    h + "attention.attention.query.bias": sd[b + "attn.q_bias"],
                    h + "attention.attention.value.bias": sd[b + "attn.v_bias"],
                    h + "attention.output.dense.weight": sd[b + "attn.proj.weight"],
                    h + "attention.output.dense.bias": sd[b + "attn.proj.bias"],
                    h + "layernorm_before.weight": sd[b + "norm1.weight"], h + "layernorm_before.bias": sd[b + "norm1.bias"],
                    h + "layernorm_after.weight": sd[b + "norm2.weight"], h + "layernorm_after.bias": sd[b + "norm2.bias"],
                    h + "intermediate.dense.weight": sd[b + "mlp.fc1.weight"], h + "intermediate.dense.bias": sd[b + "mlp.fc1.bias"],
                    h + "output.dense.weight": sd[b + "mlp.fc2.weight"], h + "output.dense.bias": sd[b + "mlp.fc2.bias"]})
    if classifier:
        out.update({"fc_norm.weight": sd["fc_norm.weight"], "fc_norm.bias": sd["fc_norm.bias"],
                    "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]})
    else:
        out.update({"layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(recipe, num_classes=0, class_names=None):
    """transformers' VideoMAEConfig fields for the recipe's architecture (a plain dict: config.json)."""
    dim, _, heads = models.SIZES[recipe["model"]]
    depth = recipe["depth"] or models.SIZES[recipe["model"]][1]
    config = {"model_type": "videomae", "architectures": ["VideoMAEForVideoClassification" if num_classes else "VideoMAEModel"],
              "image_size": recipe["input_size"], "patch_size": models.PATCH, "num_channels": 3,
              "num_frames": recipe["num_frames"], "tubelet_size": models.TUBELET, "hidden_size": dim,
              "num_hidden_layers": depth, "num_attention_heads": heads, "intermediate_size": 4 * dim, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
              "layer_norm_eps": models.EPS, "qkv_bias": True, "use_mean_pooling": bool(num_classes), "norm_pix_loss": False}
    if num_classes:
        names = class_names or [f"class {i}" for i in range(num_classes)]
        config.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    return config


def _backbone(path):
    """(state dict, recipe, class names, classifier?) of one of our weights files: a model.pth (classifier, with its
    recipe) or a pretrain.py encoder.pth (its run's recipe.yaml beside it)."""
    try:
        ckpt = models.read_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ExportError(f"{path}: cannot read: {' '.join(str(e).split())[:200]}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and ckpt.get("recipe"):
        return ckpt["model"], ckpt["recipe"], ckpt.get("class_names"), True
    beside = Path(path).parent / "recipe.yaml"
    if not beside.exists():
        raise ExportError(f"{path}: neither a finetune.py model.pth nor an encoder.pth with its run's recipe.yaml beside it")
    recipe = yaml.safe_load(beside.read_text())
    return ckpt, recipe, None, "head.weight" in ckpt


def to_hf(path, out):
    """Write `out`/config.json and `out`/model.safetensors for transformers' VideoMAE from our weights at `path`;
    nothing half-written is left (a temporary folder, renamed at the end). ExportError for what VideoMAE cannot
    express or a file that is not ours. Returns the architecture name."""
    from safetensors.torch import save_file

    sd, recipe, names, classifier = _backbone(path)
    if recipe.get("model") not in models.SIZES:
        raise ExportError(f"{path}: model {recipe.get('model')!r} is not one of {', '.join(models.SIZES)}")
    if any(k.startswith("patch_embed.stem.") for k in sd):
        raise ExportError(f"{path}: a conv patch embedding (patch_embed: conv); transformers' VideoMAE has the linear "
                          "one only (safetensors_beside keeps every weight)")
    if "head.query" in sd:
        raise ExportError(f"{path}: an attentive head (pool: attentive); transformers' VideoMAE has the mean-pooling "
                          "head only (safetensors_beside keeps every weight; fine-tune with pool: mean to export)")
    if any(k.startswith("pos_embed") for k in sd):
        raise ExportError(f"{path}: a learned position embedding; transformers' VideoMAE has the fixed sinusoid table only")
    depth = recipe["depth"] or models.SIZES[recipe["model"]][1]
    num_classes = sd["head.weight"].shape[0] if classifier else 0
    try:
        tensors = hf_state_dict(sd, depth, classifier)
    except KeyError as e:
        raise ExportError(f"{path}: not the VideoMAE/MME backbone layout this export maps (no {e.args[0]})") from None
    config = hf_config(recipe, num_classes, names)
    out = Path(out)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file({k: v.float() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return config["architectures"][0]


def safetensors_beside(path):
    """`path`'s state dict as a .safetensors file beside it (weights without pickle); returns its path."""
    from safetensors.torch import save_file

    ckpt = models.read_checkpoint(path)
    sd = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    target = Path(path).with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, str(target), metadata={"format": "pt"})
    return target
