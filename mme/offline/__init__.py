"""The offline side: videos -> shards, run once (extract.py wires it).

sources (finding videos and labels), video (decoding), flow, hog, trajectory (Appendix A), clips (which
windows become samples), synthetic (the built-in dataset), writer (shards and manifests on disk).
"""
