"""Every model family through the commands its own test file does not already drive end to end.

test_families.py runs SigLIP 2 through all of them and test_multilingual.py the multilingual towers
through most. Here the live stream (multilingual and MobileCLIP) and MobileCLIP's text, library, video
and service paths, each checked against a direct ``ClipModel`` run of the same bundle, which in turn
matches open_clip (test_mobileclip.py, test_multilingual.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipworks.cli.main import main
from clipworks.models.bundle import load_bundle
from clipworks.runtime.encoder import ClipModel

FAMILY_BUNDLES = ["xlm_roberta_bundle", "nllb_siglip_bundle", "mobileclip_bundle"]


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fixture", FAMILY_BUNDLES)
def test_stream_labels_frames_with_each_family(capsys, request, fixture: str, test_data: Path, tmp_path: Path) -> None:
    bundle = request.getfixturevalue(fixture)
    prompts = tmp_path / "embeddings.json"
    code, _, err = run(capsys, "embed", "texts", "a person walking", "a street", "-o", prompts, "-m", bundle)
    assert code == 0, err
    events = tmp_path / "events.jsonl"
    code, _, err = run(capsys, "stream", "--input", test_data / "videos" / "v_ZNVhz7ctTq0.mp4", "--model", bundle,
                       "--json-path", prompts, "--events", events, "--max-frames", 3)  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["frame"] for r in rows] == [0, 1, 2]
    assert all(r["label"] in {"a person walking", "a street"} and 0 <= r["probability"] <= 1 for r in rows)


def test_mobileclip_embed_texts_matches_the_model(capsys, mobileclip_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "texts.json"
    texts = ("a dog", "a red car")
    code, _, err = run(capsys, "embed", "texts", *texts, "--prefix", "", "-o", out, "-m", mobileclip_bundle)
    assert code == 0, err
    entries = [e for e in json.loads(out.read_text())["entries"] if e.get("embedding")]  # Hailo's six slots
    assert [e["text"] for e in entries] == ["a dog", "a red car"]
    stored = np.array([e["embedding"] for e in entries], np.float32)
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    np.testing.assert_allclose(stored, clip.encode_texts(["a dog", "a red car"]), atol=1e-5)


def test_mobileclip_index_and_search_rank_by_cosine(capsys, mobileclip_bundle: Path, photos, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    db = tmp_path / "lib.db"
    # exact pixels: the order is compared with encode_images' (exact) vectors, and close cosines may swap.
    code, _, err = run(
        capsys, "index", "add", folder, "--db", db, "--model", mobileclip_bundle, "--preprocess", "exact"
    )
    assert code == 0, err
    code, out, err = run(capsys, "search", "a street", "--db", db, "--top-k", len(photos), "--json")
    assert code == 0, err
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    cosines = (clip.encode_images([folder / p.name for p in photos]) @ clip.encode_texts(["a street"]).T)[:, 0]
    expected = [name for _, name in sorted(zip(cosines, [p.name for p in photos], strict=True), reverse=True)]
    assert [Path(h["path"]).name for h in json.loads(out)] == expected


def test_mobileclip_video_show_pred_and_interrogate(
    capsys, mobileclip_bundle: Path, test_data: Path, photos, tmp_path: Path
) -> None:
    video = test_data / "videos" / "v_GGSY1Qvo990.mp4"
    code, out, err = run(capsys, "video", "features", video, "--model", mobileclip_bundle, "--extraction-fps", 1,
                         "--show-pred", "--pred-texts", "a dog", "a woman lifting weights")  # fmt: skip
    assert code == 0, err
    blocks = re.findall(r"  Logits \| Prob\. \| Label \n((?:.+\n)+)\n", out)
    assert len(blocks) == 18 and all(len(b.splitlines()) == 2 for b in blocks)
    tags = ["dog", "street", "fruit", "a red car"]
    tags_file = tmp_path / "tags.txt"
    tags_file.write_text("\n".join(tags) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "interrogate", photos[0], "--tags-file", tags_file, "--threshold", "-1", "--top", 2,
                         "--no-cache", "-m", mobileclip_bundle, "--json")  # fmt: skip
    assert code == 0, err
    (item,) = json.loads(out)
    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    cosines = (clip.encode_images(photos[0]) @ clip.encode_texts(tags).T)[0]
    assert item["caption"] == ", ".join(tags[i] for i in np.argsort(-cosines)[:2])


def test_mobileclip_serve_embeds_as_the_model(mobileclip_bundle: Path, tmp_path: Path) -> None:
    import requests

    from clipworks.service import ServiceSettings, create_app
    from conftest import serve_app

    clip = ClipModel(load_bundle(mobileclip_bundle), device="cpu")
    app = create_app(ServiceSettings(tags_cache_dir=tmp_path / "tags"), model=clip)
    with serve_app(app) as url:
        r = requests.post(f"{url}/v1/embeddings", json={"texts": ["a dog", "fruit"]}, timeout=30)
    assert r.status_code == 200, r.text
    served = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(served, clip.encode_texts(["a dog", "fruit"]), atol=1e-5)
