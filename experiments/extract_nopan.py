"""extract.py on built-in synthetic clips with the camera pan switched off (mme.offline.synthetic.clip's
camera_prob = 0), for issue #23's question: does removing the camera's motion (which the target asks the
encoder to do, Appendix A) hold back what it learns?

    python experiments/extract_nopan.py --src synthetic --out shards/nopan/synthetic8_2k --frames 8 --split train,val --limit train=2000
"""
import functools
import runpy
import sys
from pathlib import Path

from mme.offline import synthetic

synthetic.clip = functools.partial(synthetic.clip, camera_prob=0.0)     # extraction workers are forked: they see it too
sys.argv = ["extract.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).parent.parent / "extract.py"), run_name="__main__")
