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
shards.SCHEMA_VERSION = writer.SCHEMA_VERSION = version
# One process: extract.py's worker processes are forked from a fresh forkserver that imports mme.shards anew and
# would encode with the current schema (shards made with --workers 2 before 2026-12-07 did: checked in their json)
if any(a.startswith("--workers") for a in sys.argv[2:]):
    sys.exit("extract_schema.py runs in one process (its change would not reach worker processes): drop --workers")
sys.argv = ["extract.py", *sys.argv[2:], "--workers", "1"]
runpy.run_path(str(Path(__file__).parent.parent / "extract.py"), run_name="__main__")
