"""MME: Masked Motion Encoding (Sun et al., CVPR 2023), the library extract.py, pretrain.py and finetune.py wire.

Code that reads videos and writes shards (run once, offline) is in mme/offline/; code that reads shards and
makes training batches (every step, online) is in mme/online/. The shard schema between them is mme/shards.py.
The model (model.py), recipes (recipe.py), training (train.py: process group, optimiser, checkpoints; run.py:
a run's folder around the loop), evaluation (evaluate.py: multi-view scoring; frozen.py: read-outs of frozen
features; report.py) are this package's top-level modules, with pictures in figures.py and progress and
one-line errors in progress.py. Nothing here imports bench/ or experiments/ or reads docs/.
"""
