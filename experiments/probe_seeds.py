"""How much a frozen read-out moves with the probe's own seed alone (issue #23): the same cached features
(finetune.py frozen's features.pt), the linear probe, k-NN and attentive probe fitted again with other seeds.

    python experiments/probe_seeds.py runs/i23/p2k_conv_tiny_4k_s0/features.pt --seeds 0,1,2
"""
import fire
import torch

from mme import frozen


def main(features, seeds="0,1,2", num_classes=10):
    cached = torch.load(features, map_location="cpu", weights_only=True)
    seeds = seeds if isinstance(seeds, (tuple, list)) else [seeds]               # fire reads 0,1,2 as a tuple
    for seed in [int(s) for s in seeds]:
        result, _, _ = frozen.evaluate_features(cached["train"], cached["eval"], num_classes, seed)
        scores = "  ".join(f"{k} {result[k]['top1']:.0f}" for k in ("probe", "knn", "attentive") if k in result)
        print(f"{features} seed {seed}: {scores}", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
