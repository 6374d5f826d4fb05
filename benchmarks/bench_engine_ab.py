"""Same-engine before/after: the embed pipeline and text encoding of whichever clipworks is on PYTHONPATH.

    LABEL=before PYTHONPATH=/path/to/old/src python benchmarks/bench_engine_ab.py
    LABEL=after  PYTHONPATH=src python benchmarks/bench_engine_ab.py

Uses the full-size ViT-B-32 random bundle and the 800x600 photos that ``common.py`` makes in ``.bench/``.
"""

import os
import resource
import time

from clipworks.pipeline import embed_files
from clipworks.runtime.encoder import load
from common import WORK, bundle, photo_set

photos = photo_set(64, (800, 600))
model = load(bundle("ViT-B-32"), device="cpu", precision="fp32", threads=2)
embed_files(model, photos[:8], progress=False)
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
embed_files(model, photos, progress=False)
wall = time.perf_counter() - t
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
texts = (WORK.parent / "src" / "clipworks" / "data" / "imagenet1k.txt").read_text().splitlines()[:300]
model.encode_texts(texts[:10])
t = time.perf_counter()
model.encode_texts(texts)
txt = 300 / (time.perf_counter() - t)
label = os.environ.get("LABEL", "this checkout")
print(f"{label}: {len(photos) / wall:.2f} img/s, {cpu / len(photos) * 1000:.0f} CPU-ms/img, {txt:.1f} texts/s")
