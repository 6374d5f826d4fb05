"""Tags kept: ``interrogate --write-tags`` stores each photo's tags and scores in the library; ``--tag`` filters
search through the CLI, the Library API and the gallery API (whose hits list the tags); the tags go out as XMP
sidecars (merged into existing ones) and as ``.txt`` captions (recursive, existing ones kept unless asked)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from clipworks.cli.main import main
from clipworks.library import Library, make_filters
from clipworks.library.store import MIGRATIONS, SCHEMA_VERSION
from clipworks.service import ServiceSettings, create_app, gallery
from conftest import serve_app

RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
DC = "{http://purl.org/dc/elements/1.1/}"
LR = "{http://ns.adobe.com/lightroom/1.0/}"
LABELS = ["dog", "cat", "building", "fruit", "butterfly", "sky"]


@pytest.fixture(scope="module")
def model(vit_bundle):
    import clipworks

    return clipworks.load(vit_bundle)


@pytest.fixture(scope="module")
def tagged(model, photos, tmp_path_factory):
    """A library of the photos (one in a subfolder, one under an odd name) tagged by interrogate."""
    base = tmp_path_factory.mktemp("tags")
    root = base / "photos"
    (root / "deeper").mkdir(parents=True)
    names = []
    for i, photo in enumerate(photos[:5]):
        name = ("deeper/" if i == 0 else "") + ("odd name, é.jpg" if i == 1 else photo.name)
        shutil.copy(photo, root / name)
        names.append(root / name)
    labels = base / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    db = base / "lib.db"
    bundle = str(model.bundle.root)
    assert main(["index", "add", str(root), "--db", str(db), "--model", bundle]) == 0
    return {"root": root, "db": db, "labels": labels, "bundle": bundle, "names": names}


def interrogate_argv(tagged, target: Path, *extra: str) -> list[str]:
    """``interrogate`` of ``target`` with the test labels: every image gets its two best tags."""
    return ["interrogate", str(target), "--tags-file", str(tagged["labels"]), "--threshold", "-1", "--top", "2",
            "--no-cache", "--model", tagged["bundle"], *extra]  # fmt: skip


def interrogate(tagged, capsys) -> dict[str, list[dict]]:
    assert main(interrogate_argv(tagged, tagged["root"], "--json")) == 0
    return {item["image"]: item["interrogations"] for item in json.loads(capsys.readouterr().out)}


@pytest.fixture(scope="module")
def written(tagged):
    """What ``--write-tags`` stored: path -> [(tag, score)], read straight from SQLite."""
    assert main(interrogate_argv(tagged, tagged["root"], "--write-tags", "--db", str(tagged["db"]))) == 0
    conn = sqlite3.connect(tagged["db"])
    rows = conn.execute("SELECT f.path, t.tag, t.score FROM tags t JOIN files f ON f.id = t.file_id").fetchall()
    conn.close()
    out: dict[str, list[tuple[str, float]]] = {}
    for path, tag, score in rows:
        out.setdefault(path, []).append((tag, score))
    return out


def test_write_tags_stores_what_interrogate_reports(tagged, written, capsys) -> None:
    reported = interrogate(tagged, capsys)
    assert set(written) == {str(p) for p in tagged["names"]}
    for path, tags in reported.items():
        assert sorted(written[path]) == sorted((t["tag"], pytest.approx(t["score"])) for t in tags)
    store = Library(tagged["db"]).store
    assert store.version == SCHEMA_VERSION  # the tags migration (4) ran, with those after it
    assert "CREATE TABLE tags" in MIGRATIONS[3] and store.conn.execute("SELECT count(*) FROM tags").fetchone()[0]


def with_tag(written, tag: str) -> set[str]:
    return {os.path.basename(p) for p, tags in written.items() if any(t == tag for t, _ in tags)}


def test_tag_filter_through_cli_and_api(tagged, written, capsys) -> None:
    tag = next(iter(written.values()))[0][0]
    want = with_tag(written, tag)
    assert want  # the first photo's best tag names at least that photo
    assert (
        main(["search", "a", "photo", "--db", str(tagged["db"]), "--tag", tag.upper(), "--top-k", "50", "--json"]) == 0
    )
    assert {os.path.basename(h["path"]) for h in json.loads(capsys.readouterr().out)} == want
    with Library(tagged["db"]) as library:
        hits = library.search("a photo", top_k=50, filters=make_filters(tag=tag))
        assert {os.path.basename(h.path) for h in hits} == want
        assert library.search("a photo", filters=make_filters(tag="no such tag")) == []
    assert main(["search", "x", "--db", str(tagged["db"]), "--tag", " "]) == 2
    assert "--tag" in capsys.readouterr().err


def test_gallery_hits_list_tags_and_filter_by_them(model, tagged, written, tmp_path) -> None:
    tag = next(iter(written.values()))[0][0]
    settings = ServiceSettings(tags=["dog"], tags_cache_dir=tmp_path / "tags")
    # A generous timeout: on a loaded machine the first query waits for the text tower to load.
    with (
        Library(tagged["db"], model) as library,
        serve_app(create_app(settings, model=model, library=library, routers=[gallery.router])) as url,
        httpx.Client(timeout=120) as client,
    ):
        body = client.get(f"{url}/api/search", params={"q": "a photo", "k": 50}).json()
        for hit in body["results"]:
            assert [(t["tag"], t["score"]) for t in hit["tags"]] == [
                (t, pytest.approx(s, abs=1e-6)) for t, s in sorted(written[hit["path"]], key=lambda p: -p[1])
            ]
        everything = client.get(f"{url}/api/search", params={"q": "a photo", "k": 50, "tag": tag.upper()}).json()
        assert {h["name"] for h in everything["results"]} == with_tag(written, tag)
        first = client.get(f"{url}/api/search", params={"q": "a photo", "k": 1, "tag": tag}).json()
        assert first["next_cursor"] is not None or len(everything["results"]) == 1
        if first["next_cursor"]:  # the cursor belongs to this filter: another tag refuses it
            params = {"q": "a photo", "k": 1, "tag": "sky", "cursor": first["next_cursor"]}
            assert client.get(f"{url}/api/search", params=params).status_code == 400


def subjects(xmp: Path) -> tuple[list[str], list[str], ET.Element]:
    root = ET.parse(xmp).getroot()
    description = root.find(f"{RDF}RDF/{RDF}Description")
    keywords = [li.text for li in description.findall(f"{DC}subject/{RDF}Bag/{RDF}li")]
    hierarchy = [li.text for li in description.findall(f"{LR}hierarchicalSubject/{RDF}Bag/{RDF}li")]
    return keywords, hierarchy, description


def test_xmp_sidecars_are_written_and_merged(tagged, written, capsys) -> None:
    photo, odd = tagged["names"][2], tagged["names"][1]
    mine = photo.with_name(photo.name + ".xmp")
    mine.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:lr="http://ns.adobe.com/lightroom/1.0/">'
        "<dc:subject><rdf:Bag><rdf:li>holiday</rdf:li><rdf:li>stale</rdf:li></rdf:Bag></dc:subject>"
        "<lr:hierarchicalSubject><rdf:Bag><rdf:li>clipworks|stale</rdf:li></rdf:Bag></lr:hierarchicalSubject>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    broken = tagged["names"][3].with_name(tagged["names"][3].name + ".xmp")
    broken.write_text("<not xml")
    assert main(["index", "sidecars", "--format", "xmp", "--db", str(tagged["db"])]) == 0
    err = capsys.readouterr().err
    assert f"wrote {len(written) - 1} .xmp sidecars" in err
    assert str(broken) in err and "not well-formed" in err and broken.read_text() == "<not xml"
    keywords, hierarchy, description = subjects(mine)
    ours = [t for t, _ in sorted(written[str(photo)], key=lambda p: -p[1])]
    assert keywords == ["holiday", *ours]  # the user's keyword stays, the stale clipworks one goes
    assert hierarchy == [f"clipworks|{t}" for t in ours]
    assert description.get("{http://ns.adobe.com/xap/1.0/}Rating") == "4"
    keywords, _, _ = subjects(odd.with_name(odd.name + ".xmp"))
    assert keywords == [t for t, _ in sorted(written[str(odd)], key=lambda p: -p[1])]


def test_txt_sidecars_recursive_skip_and_overwrite(tagged, capsys) -> None:
    root = tagged["root"]
    reported = interrogate(tagged, capsys)
    kept = tagged["names"][4].with_suffix(".txt")
    kept.write_text("my own caption\n")
    assert main(interrogate_argv(tagged, root, "--sidecar", "txt")) == 0
    assert "kept 1 that exist" in capsys.readouterr().err
    for photo in tagged["names"]:
        caption = photo.with_suffix(".txt").read_text()
        if photo == tagged["names"][4]:
            assert caption == "my own caption\n"
        else:
            assert caption == ", ".join(t["tag"] for t in reported[str(photo)]) + "\n"
    assert (root / "deeper" / (tagged["names"][0].stem + ".txt")).is_file()  # in the subfolder, beside its photo
    assert main(interrogate_argv(tagged, kept.with_suffix(".jpg"), "--sidecar", "txt", "--overwrite")) == 0
    assert kept.read_text() != "my own caption\n"


def test_write_tags_names_images_outside_the_library(tagged, photos, tmp_path, capsys) -> None:
    outside = tmp_path / "outside.jpg"
    shutil.copy(photos[0], outside)
    assert main(["interrogate", str(outside), "--tags-file", str(tagged["labels"]), "--no-cache", "--model",
                 tagged["bundle"], "--write-tags", "--db", str(tagged["db"])]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert str(outside) in err and "not in the library" in err
    assert main(["interrogate", str(outside), "--tags-file", str(tagged["labels"]), "--sidecar", "csv"]) == 2
