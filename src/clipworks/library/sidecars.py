"""Tags written next to each photo, in the formats other tools read: a registry of sidecar formats.

- ``txt``: ``photo.jpg`` -> ``photo.txt``, the tags comma-separated on one line: the caption files image-model
  training sets use (kohya-ss, the AUTOMATIC1111 web UI, OneTrainer).
- ``xmp``: ``photo.jpg`` -> ``photo.jpg.xmp``, the tags as ``dc:subject`` keywords plus ``lr:hierarchicalSubject``
  entries under ``clipworks|``, as darktable and digiKam name and read sidecars (the full name, so that
  ``IMG_1.CR2`` and ``IMG_1.JPG`` keep apart; Lightroom reads sidecars of RAW files only, under the stem).

An existing XMP sidecar is merged, not replaced: its other content stays, the keywords an earlier clipworks
run wrote (those it listed under ``clipworks|``) give way to the new ones, and the user's own keywords stay.
One that is no XMP packet is refused and left as it was. An existing ``.txt`` is kept unless ``overwrite``.
A new format is one new class in `SIDECAR_FORMATS`.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from clipworks.atomic import atomic_path
from clipworks.errors import ClipworksError, UsageError

X = "adobe:ns:meta/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
OURS = "clipworks|"  # the branch of lr:hierarchicalSubject that marks the keywords clipworks wrote
PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
NAMESPACES = {"x": X, "rdf": RDF, "dc": DC, "lr": LR}


@dataclass
class SidecarReport:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # existed, and overwrite was not asked
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (sidecar, why)


class SidecarFormat(Protocol):
    name: ClassVar[str]

    def path_for(self, photo: Path) -> Path: ...

    def write(self, photo: Path, tags: Sequence[str], overwrite: bool, report: SidecarReport) -> None: ...


class TxtSidecar:
    """One caption line per photo, the stem's ``.txt``."""

    name: ClassVar[str] = "txt"

    def path_for(self, photo: Path) -> Path:
        return photo.with_suffix(".txt")

    def write(self, photo: Path, tags: Sequence[str], overwrite: bool, report: SidecarReport) -> None:
        target = self.path_for(photo)
        if (target.exists() or target.is_symlink()) and not overwrite:
            report.kept.append(target)
            return
        _replace(target, ", ".join(tags) + "\n")
        report.written.append(target)


class XmpSidecar:
    """Keywords in ``<photo name>.xmp``, merged into what is there."""

    name: ClassVar[str] = "xmp"

    def path_for(self, photo: Path) -> Path:
        return photo.with_name(photo.name + ".xmp")

    def write(self, photo: Path, tags: Sequence[str], overwrite: bool, report: SidecarReport) -> None:
        target = self.path_for(photo)
        try:
            text = merge_xmp(target.read_bytes() if target.exists() else None, tags)
        except XmpRefused as e:
            report.refused.append((target, str(e)))
            return
        _replace(target, text)
        report.written.append(target)


SIDECAR_FORMATS: dict[str, SidecarFormat] = {f.name: f for f in (TxtSidecar(), XmpSidecar())}


def sidecar_format(name: str, flag: str = "--sidecar") -> SidecarFormat:
    found = SIDECAR_FORMATS.get(name)
    if found is None:
        raise UsageError(f"{flag} must be one of {', '.join(SIDECAR_FORMATS)}, not {name!r}")
    return found


def write_sidecars(
    items: Sequence[tuple[str | Path, Sequence[str]]], fmt: str, *, overwrite: bool = False
) -> SidecarReport:
    """Write each photo's tags (best first) next to it in ``fmt`` (`SIDECAR_FORMATS`)."""
    writer = sidecar_format(fmt)
    report = SidecarReport()
    for photo, tags in items:
        writer.write(Path(photo), list(tags), overwrite, report)
    return report


def _replace(target: Path, text: str) -> None:
    try:
        with atomic_path(target) as tmp:  # whole or not at all: a tool never reads half a sidecar
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ClipworksError(f"cannot write {target} ({e.strerror or e}): check the folder's permissions") from e


# -- XMP ---------------------------------------------------------------------------------------------------


class XmpRefused(Exception):
    """An existing sidecar this code will not rewrite (it is not an XMP packet it can read)."""


def merge_xmp(existing: bytes | None, tags: Sequence[str]) -> str:
    """The XMP text of ``existing`` (None: a new packet) with ``tags`` as clipworks' keywords."""
    if existing is None:
        root = ET.Element(f"{{{X}}}xmpmeta")
        rdf = ET.SubElement(root, f"{{{RDF}}}RDF")
        prefixes = dict(NAMESPACES)
    else:
        root, prefixes = _parse(existing)
        rdf = root if root.tag == f"{{{RDF}}}RDF" else root.find(f"{{{RDF}}}RDF")
        if rdf is None:
            raise XmpRefused("it holds no rdf:RDF element, so it is no XMP sidecar; move it aside to write one")
    # The description already holding keywords, else the first one, else a new one.
    descriptions = rdf.findall(f"{{{RDF}}}Description")
    with_keywords = [d for d in descriptions if d.find(f"{{{DC}}}subject") is not None]
    description = (with_keywords or descriptions or [None])[0]
    if description is None:
        description = ET.SubElement(rdf, f"{{{RDF}}}Description", {f"{{{RDF}}}about": ""})
    subjects = _bag(description, f"{{{DC}}}subject")
    hierarchy = _bag(description, f"{{{LR}}}hierarchicalSubject")
    earlier = {entry[len(OURS) :] for entry in _items(hierarchy) if entry.startswith(OURS)}
    keep = [s for s in _items(subjects) if s not in earlier and s not in tags]
    _fill(subjects, [*keep, *tags])
    _fill(hierarchy, [*(h for h in _items(hierarchy) if not h.startswith(OURS)), *(OURS + t for t in tags)])
    for prefix, uri in {**NAMESPACES, **prefixes}.items():
        with contextlib.suppress(ValueError):  # a prefix ElementTree reserves (ns0, ...): it picks its own
            ET.register_namespace(prefix, uri)
    ET.indent(root)
    # The packet wrapper of XMP part 1 (7.3), as exiv2 writes sidecars: "w", the packet may be rewritten.
    return f'{PACKET_BEGIN}\n{ET.tostring(root, encoding="unicode")}\n<?xpacket end="w"?>\n'


def _parse(data: bytes) -> tuple[ET.Element, dict[str, str]]:
    """The root element and the prefixes the file declares (kept as they were when it is written back)."""
    import io

    prefixes: dict[str, str] = {}
    try:
        for event, item in ET.iterparse(io.BytesIO(data), events=("start-ns",)):
            if event == "start-ns":
                prefix, uri = item  # type: ignore[misc]
                if prefix and prefix not in prefixes:
                    prefixes[prefix] = uri
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise XmpRefused(f"it is not well-formed XML ({e}); fix or move it aside to write one") from e
    return root, prefixes


def _bag(description: ET.Element, name: str) -> ET.Element:
    """The ``rdf:Bag`` of property ``name`` in ``description``, made when missing."""
    prop = description.find(name)
    if prop is None:
        prop = ET.SubElement(description, name)
    bag = prop.find(f"{{{RDF}}}Bag")
    if bag is None:
        bag = ET.SubElement(prop, f"{{{RDF}}}Bag")
    return bag


def _items(bag: ET.Element) -> list[str]:
    return [li.text or "" for li in bag.findall(f"{{{RDF}}}li")]


def _fill(bag: ET.Element, values: Sequence[str]) -> None:
    for li in bag.findall(f"{{{RDF}}}li"):
        bag.remove(li)
    for value in dict.fromkeys(values):  # each once, in order
        ET.SubElement(bag, f"{{{RDF}}}li").text = value
