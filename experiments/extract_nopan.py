"""extract.py on built-in synthetic clips with the camera pan switched off (mme.offline.synthetic.clip's
camera_prob = 0), for issue #23's question: does removing the camera's motion (which the target asks the
encoder to do, Appendix A) hold back what it learns?

    python experiments/extract_nopan.py --src synthetic --out shards/nopan/synthetic8_2k --frames 8 --split train,val --limit train=2000
    bash experiments/cell.sh nopan_s0 shards/synthetic8/ --data_path shards/nopan/synthetic8_2k/
"""
import functools
import runpy
import sys
from pathlib import Path

from mme.offline import synthetic

synthetic.clip = functools.partial(synthetic.clip, camera_prob=0.0)
# One process: extract.py's worker processes are forked from a fresh forkserver that imports mme.offline.synthetic
# anew, without this change (shards made with --workers 2 before 2026-12-07 had pans: checked member by member)
if any(a.startswith("--workers") for a in sys.argv[1:]):
    sys.exit("extract_nopan.py runs in one process (its change would not reach worker processes): drop --workers")
sys.argv = ["extract.py", *sys.argv[1:], "--workers", "1"]
runpy.run_path(str(Path(__file__).parent.parent / "extract.py"), run_name="__main__")
