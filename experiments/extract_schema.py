"""extract.py writing an older shard schema, for issue #27's question: does schema 3's coarser coding change
what pre-training learns? (The loader reads every version in mme.shards.READABLE.)

    python experiments/extract_schema.py 2 --src synthetic --out shards/v2/synthetic8 --frames 8 --split train,val --quality 90

The version's own codes are used (mme.shards.encode follows the sample's schema); JPEG quality is extract.py's
--quality (version 2 wrote 90). Only for comparisons: extract.py itself always writes mme.shards.SCHEMA_VERSION.
"""
import runpy
import sys
from pathlib import Path

from mme import shards
from mme.offline import writer

version = int(sys.argv[1])
if version not in shards.READABLE:
    raise SystemExit(f"schema {version}: this code reads {shards.READABLE}")
shards.SCHEMA_VERSION = writer.SCHEMA_VERSION = version    # extraction workers are forked: they see it too
sys.argv = ["extract.py", *sys.argv[2:]]
runpy.run_path(str(Path(__file__).parent.parent / "extract.py"), run_name="__main__")
