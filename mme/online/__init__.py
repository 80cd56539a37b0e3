"""The online side: shards -> training batches, every step (pretrain.py and finetune.py use it).

stream (finding and reading shards, the rank/worker split), s3 (object storage), transforms and augment
(crops, flips, RandAugment, mixing), targets (what the decoder reconstructs, the masks), data (the loader),
dali (its GPU backend).
"""
