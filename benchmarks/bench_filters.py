"""Filtered semantic search over the photo library, and what reading metadata costs while indexing.

1. Search latency with filters (chosen in SQL, then exact top-k over just those rows) over synthetic
   libraries: random unit 512-d vectors and realistic metadata rows (ten years of dates in a dozen time
   zones, 40 cities with GPS jitter and a third of photos without a position, a skewed mix of 25
   cameras, a folder per day, 5% videos), written straight into a clipworks library file. Selective and
   broad filters, each against the unfiltered search in the same run; the query vector is given (text
   encoding is the same with or without filters: see bench_library.py).
2. Metadata extraction per photo (`extract_metadata`, the indexer's per-file hook after the hash) against
   the whole of indexing per photo (`Library.index`, what `clipworks index add` runs, with the default
   architecture ViT-B-32, random weights) in the same run, on real photos (the shipped check photos,
   Debian's opencv-doc samples) and on 1600x1200 JPEGs made from them carrying a phone's EXIF.

    python benchmarks/bench_filters.py --sizes 100000,1000000
    CLIPWORKS_HOME=/tmp/scalebench/home python benchmarks/bench_filters.py --skip search  # after exporting
                                                                # ViT-B-32 --pretrained random there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, WORK, machine, opencv_photos, photo_set

DIM = 512
CITIES = 40
CAMERAS = [f"{make}|{model}" for make, models in {
    "Apple": ["iPhone 12", "iPhone 13", "iPhone 14 Pro", "iPhone 15 Pro"],
    "samsung": ["SM-G991B", "SM-S911B", "SM-A536B"],
    "Google": ["Pixel 6", "Pixel 7", "Pixel 8 Pro"],
    "Canon": ["EOS R5", "EOS 5D Mark IV", "EOS M50"],
    "NIKON CORPORATION": ["NIKON Z 6", "NIKON D750"],
    "SONY": ["ILCE-7M3", "ILCE-6400"],
    "FUJIFILM": ["X-T4", "X100V"],
    "OLYMPUS CORPORATION": ["E-M10MarkIII"],
    "Panasonic": ["DC-GH5"],
    "LEICA CAMERA AG": ["LEICA Q2"],
    "DJI": ["FC3582"],
    "GoPro": ["HERO10 Black"],
}.items() for model in models]  # fmt: skip
ZONES = [-8, -7, -5, -4, -3, 0, 1, 2, 3, 5.5, 8, 9]  # hours east of UTC
START = 1_388_534_400  # 2014-01-01
SPAN = 10 * 365 * 86_400


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q))


def synthetic_library(count: int) -> tuple[Path, dict[str, object]]:
    """A library of ``count`` photos with metadata and random vectors (made once, kept in .bench/)."""
    from clipworks.library.metadata import METADATA_COLUMNS
    from clipworks.library.store import Store

    db = WORK / f"bench-filters-{count}.db"
    rng = np.random.default_rng(count)
    cities = np.column_stack([rng.uniform(-50, 60, CITIES), rng.uniform(-120, 140, CITIES)])
    facts: dict[str, object] = {"city": cities[0].tolist()}
    if db.exists():
        return db, facts
    for f in WORK.glob(f"bench-filters-{count}.db*"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    WORK.mkdir(exist_ok=True)
    camera_weights = 1 / np.arange(1, len(CAMERAS) + 1)  # a few phones take most photos (Zipf)
    camera_weights /= camera_weights.sum()
    with Store(db) as store:
        model = store.ensure_model("bench-512", "bench-random", DIM, None)
        columns = ", ".join(("id", "path", "size", "mtime_ns", "updated_at", *METADATA_COLUMNS))
        marks = ", ".join("?" * (5 + len(METADATA_COLUMNS)))
        with store.write() as conn:
            for start in range(0, count, 50_000):
                n = min(50_000, count - start)
                taken = np.sort(rng.integers(START, START + SPAN, n))  # paths in time order, as cameras name them
                offsets = (rng.choice(ZONES, n) * 3600).astype(int)
                city = rng.integers(0, CITIES, n)
                has_place = rng.random(n) > 1 / 3
                lat = cities[city, 0] + rng.normal(0, 0.05, n)
                lon = cities[city, 1] + rng.normal(0, 0.05, n)
                camera = rng.choice(len(CAMERAS), n, p=camera_weights)
                video = rng.random(n) < 0.05
                vectors = rng.standard_normal((n, DIM)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                rows = []
                for i in range(n):
                    file_id = start + i + 1
                    day = time.strftime("%Y/%m-%d", time.gmtime(int(taken[i])))
                    make, name = CAMERAS[camera[i]].split("|")
                    place = (float(lat[i]), float(lon[i])) if has_place[i] else (None, None)
                    rows.append((file_id, f"/photos/{day}/{file_id:07d}.{'mp4' if video[i] else 'jpg'}", 1, 1, 0,
                                 float(taken[i]), int(offsets[i]), "exif", *place, make, name, None, 4032, 3024, 1,
                                 12.0 if video[i] else None, "video" if video[i] else "photo"))  # fmt: skip
                conn.executemany(f"INSERT INTO files ({columns}) VALUES ({marks})", rows)
                conn.executemany(
                    "INSERT INTO embeddings (model_id, file_id, vector) VALUES (?, ?, ?)",
                    ((model.id, start + i + 1, vectors[i].tobytes()) for i in range(n)),
                )
    return db, facts


def filtered_latency(count: int, queries: int) -> dict[str, object]:
    from clipworks.library import Library, make_filters

    db, facts = synthetic_library(count)
    lat, lon = facts["city"]  # type: ignore[misc]
    cases = {
        "none": None,
        # Selective: a few hundred photos or fewer at 100,000.
        # the folder filter is the one answered in SQL (a range scan of the path index)
        "selective: one week": make_filters(after="2019-06-01", before="2019-06-07"),
        "selective: rare camera + 5 km": make_filters(camera="leica", near=f"{lat},{lon},5"),
        "selective: one day's folder": make_filters(folder="/photos/2020/07-14"),
        # Broad: most of the library.
        "broad: after 2016": make_filters(after="2016-01-01"),
        "broad: photos only": make_filters(kind="photo"),
        "broad: iPhone, 2015 on": make_filters(camera="iphone", after="2015-01-01"),
    }
    lib = Library(db, ann="off")
    rng = np.random.default_rng(1)
    warm = rng.standard_normal(DIM).astype(np.float32)
    t0 = time.perf_counter()
    lib.search_vector(warm)  # loads (or builds) the matrix
    t1 = time.perf_counter()
    lib.filtered_rows(make_filters(kind="photo"))  # reads the filterable columns, once per library change
    out_load = {"matrix_load_s": t1 - t0, "facets_load_s": time.perf_counter() - t1}
    out: dict[str, object] = {"count": count, **out_load}
    for name, filters in cases.items():
        prefilter: list[float] = []
        total: list[float] = []
        matched = 0
        for _ in range(queries):
            q = rng.standard_normal(DIM).astype(np.float32)
            q /= np.linalg.norm(q)
            if filters is not None:
                t0 = time.perf_counter()
                matched = len(lib.filtered_rows(filters))
                prefilter.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hits = lib.search_vector(q, top_k=24, filters=filters)
            total.append(time.perf_counter() - t0)
        out[name] = {
            "matched": matched if filters is not None else count,
            "hits": len(hits),
            "p50_ms": pct(total, 50),
            "p99_ms": pct(total, 99),
            "prefilter_p50_ms": pct(prefilter, 50) if prefilter else 0.0,
        }
    lib.close()
    return out


def with_exif(paths: list[Path]) -> list[Path]:
    """Copies of ``paths`` carrying a phone's EXIF (date with offset, GPS, make, model, lens)."""
    from PIL import ExifTags, Image
    from PIL.TiffImagePlugin import IFDRational

    folder = WORK / "photos-exif"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        target = folder / path.name
        if not target.exists():
            exif = Image.Exif()
            exif[0x010F], exif[0x0110], exif[0x0112] = "Apple", "iPhone 15 Pro", 6
            sub = exif.get_ifd(ExifTags.IFD.Exif)
            sub[0x9003], sub[0x9011], sub[0xA434] = f"2024:06:{1 + i % 28:02d} 12:00:00", "+02:00", "iPhone back camera"
            gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
            gps[1], gps[2] = "N", (IFDRational(48, 1), IFDRational(51, 1), IFDRational(3000, 100))
            gps[3], gps[4] = "E", (IFDRational(2, 1), IFDRational(21, 1), IFDRational(700, 100))
            Image.open(path).save(target, exif=exif, quality=90)
        out.append(target)
    return out


def photo_sets(count: int) -> dict[str, list[Path]]:
    """Real photos as they come (the shipped check photos, Debian's opencv-doc samples: small, most without
    EXIF) and phone-sized JPEGs made from them carrying a phone's EXIF."""
    return {
        "shipped check photos": sorted((ROOT / "src" / "clipworks" / "data" / "check_images").glob("*.jpg")),
        "opencv-doc samples": opencv_photos(),
        "1600x1200 with EXIF": with_exif(photo_set(count)),
    }


def extraction_ms(paths: list[Path], rounds: int) -> tuple[float, float]:
    """``extract_metadata`` per photo, bytes in the page cache as after the indexer's hash: p50 wall ms and
    mean CPU ms of the calling thread (CPU time barely moves with the machine's load; wall time does)."""
    from clipworks.library.metadata import extract_metadata

    for p in paths:
        p.read_bytes()
    wall, cpu = [], 0.0
    for _ in range(rounds):
        for p in paths:
            t0, c0 = time.perf_counter(), time.thread_time()
            extract_metadata(str(p))
            cpu += time.thread_time() - c0
            wall.append(time.perf_counter() - t0)
    return pct(wall, 50), 1000 * cpu / len(wall)


def indexing_ms(clip: object, paths: list[Path], name: str) -> tuple[float, float]:
    """``Library.index`` (what ``clipworks index add`` runs: scan, hash, metadata, decode, embed, store) into
    a new library, per photo: wall ms and CPU ms of the whole process (all its threads)."""
    from clipworks.library import Library

    folder = WORK / "index-photos" / name.replace(" ", "-")
    shutil.rmtree(folder.parent / "db", ignore_errors=True)
    (folder.parent / "db").mkdir(parents=True)
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if not (folder / p.name).exists():
            shutil.copyfile(p, folder / p.name)
    with Library(folder.parent / "db" / "library.db", clip, create=True, ann="off") as lib:
        t0, c0 = time.perf_counter(), sum(os.times()[:2])
        report = lib.index([folder], progress=False)
        wall, cpu = time.perf_counter() - t0, sum(os.times()[:2]) - c0
    assert report.embedded == len(paths), report
    return 1000 * wall / len(paths), 1000 * cpu / len(paths)


def extraction_share(count: int, rounds: int, model: str) -> dict[str, dict[str, float]]:
    """Metadata extraction against the whole of indexing per photo, each photo set in the same run."""
    from clipworks import load

    clip = load(model, threads=2)
    clip.encode_images([Image.new("RGB", (224, 224))])  # sessions made and warmed outside the timings
    out = {}
    for name, paths in photo_sets(count).items():
        before = extraction_ms(paths, rounds)
        index_wall, index_cpu = indexing_ms(clip, paths, name)
        after = extraction_ms(paths, rounds)  # either side of the indexing: the load moves meanwhile
        wall, cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        out[name] = {
            "photos": len(paths),
            "extract_p50_ms": wall,
            "extract_cpu_ms": cpu,
            "index_ms": index_wall,
            "index_cpu_ms": index_cpu,
            "share_wall_pct": 100 * wall / index_wall,
            "share_cpu_pct": 100 * cpu / index_cpu,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--photos", type=int, default=32, help="JPEGs of 1600x1200 for the extraction cost.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="ViT-B-32::random", help="Model indexing embeds with.")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: search,extract")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"machine: {machine()}")
    print("load average at start: {:.1f} {:.1f} {:.1f}\n".format(*os.getloadavg()), flush=True)
    results: dict[str, object] = {"machine": machine()}
    if "extract" not in skip:
        shares = extraction_share(args.photos, args.rounds, args.model)
        results["extraction"] = shares
        print(f"metadata extraction against indexing with {args.model}, per photo (load {os.getloadavg()[0]:.1f})")
        for name, r in shares.items():
            print(f"  {name:22s} {r['photos']:3d} photos: extract p50 {r['extract_p50_ms']:.2f} ms (CPU "
                  f"{r['extract_cpu_ms']:.2f} ms), index {r['index_ms']:.0f} ms (CPU {r['index_cpu_ms']:.0f} ms): "
                  f"{r['share_wall_pct']:.2f}% of indexing's wall, {r['share_cpu_pct']:.2f}% of its CPU")  # fmt: skip
        print(flush=True)
    if "search" not in skip:
        for size in (int(s) for s in args.sizes.split(",")):
            r = filtered_latency(size, args.queries)
            results[f"search_{size}"] = r
            print(f"filtered search, top 24 of {size:,} photos ({args.queries} queries, exact); matrix loaded in "
                  f"{r['matrix_load_s']:.2f} s, filter columns in {r['facets_load_s']:.2f} s")  # fmt: skip
            for name, row in r.items():
                if isinstance(row, dict):
                    print(f"  {name:32s} {row['matched']:>9,} match  p50 {row['p50_ms']:7.1f} ms  "
                          f"p99 {row['p99_ms']:7.1f} ms  (filter p50 {row['prefilter_p50_ms']:.1f} ms)")  # fmt: skip
            print(flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
