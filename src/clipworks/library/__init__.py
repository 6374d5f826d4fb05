"""The photo library: folders indexed into one SQLite file, searched by text, image or both.

``Library`` is the one object callers need (the CLI, a web server)::

    lib = Library("library.db", model="ViT-B-32::openai", create=True)
    lib.index(["~/Pictures"])
    lib.search("beach -people", top_k=20)   # [Hit(path, score, time), ...], highest cosine first
    lib.search("beach", filters=make_filters(after="2024-06-01", camera="pixel"), offset=20)

A video is searched as its moments (`clipworks.library.videos`): a hit in one has the video's path and
``time``, the seconds into it; a photo's ``time`` is None.

Reads are thread-safe: every thread gets its own SQLite connection, and the cached matrix is swapped
whole when the database's generation changes (another process indexing, say).
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np

from clipworks.errors import UsageError, status
from clipworks.library.ann import ANN_MIN_ROWS, AnnDtype, AnnIndex, AnnMode, check_ann_options, sync_ann, wants_ann
from clipworks.library.indexer import IndexReport
from clipworks.library.metadata import Filters, make_filters
from clipworks.library.search import ExactIndex, Hit, MatrixCache, Term, combine_terms, parse_query, query_texts
from clipworks.library.store import SCHEMA_VERSION, FileRow, ModelRow, Revision, Store, Target
from clipworks.models.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from clipworks.library.interchange import ExportReport
    from clipworks.library.metadata import Facets, FileFacets, Metadata, SortKey

__all__ = [
    "SCHEMA_VERSION", "Filters", "Hit", "IndexReport", "Library", "LibraryStatus", "Term", "make_filters",
    "parse_query",
]  # fmt: skip


class ModelRows(Protocol):
    """Where a library's models are listed: a SQLite `Store`, or a shared `postgres.PostgresStore`."""

    def models(self) -> list[ModelRow]: ...

    def find_model(self, name: str, fingerprint: str) -> ModelRow | None: ...


def load_indexed_model(row: ModelRow, where: str, load_opts: dict[str, Any]) -> Any:
    """The model from where the stored vectors' model was loaded, if that is still the same model: a
    bundle re-exported there with other weights makes vectors that cannot be compared with these."""
    from clipworks.runtime.encoder import load

    clip = load(row.source, **load_opts)
    if model_fingerprint(clip).vectors != (row.name, row.fingerprint) or clip.embed_dim != row.dim:
        raise UsageError(
            f"{row.source} now holds {clip.name} ({clip.embed_dim}-d), not the {row.name} ({row.dim}-d) whose "
            f"vectors {where} holds: pass --model with that model, or index again with --model {row.source}"
        )
    return clip


def resolve_model(store: ModelRows, clip: Any, model_arg: Any, where: str) -> ModelRow:
    """The stored model whose vectors a library searches: ``clip``'s (None: the only one stored)."""
    models = store.models()
    if clip is None:
        if len(models) == 1:
            return models[0]
        if not models:
            raise UsageError(f"the library {where} is empty: run `clipworks index add DIR` first")
        names = ", ".join(m.name for m in models)
        raise UsageError(f"{where} holds vectors of several models ({names}); pick one with --model")
    name, weights = model_fingerprint(clip).vectors
    found = store.find_model(name, weights)
    if found is None:
        # The same name can come from other weights (a bundle exported again): say so with the dimension.
        have = ", ".join(f"{m.name} ({m.dim}-d{', other weights' if m.name == name else ''})" for m in models)
        raise UsageError(
            f"{where} has no vectors for {name} (it has: {have or 'none'}); run `clipworks index add DIR "
            f"--model {model_arg or name}` first"
        )
    return found


def check_cosine(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be a cosine between -1 and 1, not {threshold}")


class LibraryBase(ABC):
    """What a SQLite `Library` and a shared `postgres.PostgresLibrary` have in common: a store connection per
    thread, the model whose vectors the store holds (loaded on first use from where it was indexed from), and
    the query language. A subclass opens its store, says where it lives, finds a photo's stored vector and
    ranks; `search` and `search_vector` are then the same for both."""

    def _init_model(self, model: Any, load_opts: dict[str, Any]) -> None:
        self._model_arg = model
        self._load_opts = load_opts
        self._clip: Any = None if model is None or isinstance(model, str | Path) else model
        self._row: ModelRow | None = None
        self._local = threading.local()
        self._lock = threading.RLock()
        self._stores: list[Any] = []

    @abstractmethod
    def _open_store(self) -> Any:
        """A new connection to the store, for the calling thread."""

    @property
    @abstractmethod
    def where(self) -> str:
        """The store as messages name it (a path; a URL without its password)."""

    @abstractmethod
    def _rank(
        self,
        vector: np.ndarray,
        top_k: int,
        threshold: float | None,
        exclude: Sequence[int],
        filters: Filters | None,
        offset: int,
    ) -> list[tuple[int, float]]:
        """(search key, cosine) ranked ``offset`` to ``offset + top_k`` by score among what ``filters`` let
        through (chosen first, then ranked); the arguments already checked by `ranked`."""

    @abstractmethod
    def _local_times(self, file_ids: list[int]) -> dict[int, float | None]:
        """File id -> wall-clock capture time (`Metadata.local_time`), for ``sort="date"``."""

    @abstractmethod
    def _recent(self, top_k: int, filters: Filters | None, offset: int) -> list[int]:
        """The page of `recent`, its arguments already checked."""

    @abstractmethod
    def month_counts(self, filters: Filters | None = None) -> list[tuple[str, int]]:
        """(``YYYY-MM``, photos and videos) of each month that ``filters`` let one through in, newest first
        (by the wall clock where taken; those of unknown time are not counted)."""

    @abstractmethod
    def vectors_of(self, keys: Sequence[int]) -> np.ndarray:
        """The stored vectors of the search keys ``keys`` (all present), in their order."""

    @abstractmethod
    def photo_vectors(self) -> ExactIndex:
        """The model's vectors of the photos (no video moments), by file id ascending."""

    @abstractmethod
    def key_counts(self) -> tuple[int, int]:
        """(photos, video moments) the model's vectors cover: what a query ranks."""

    @abstractmethod
    def folders(self) -> list[str]:
        """The folders indexed into this library."""

    @abstractmethod
    def cameras(self) -> list[tuple[str, int]]:
        """("make model", photos) of each camera in the library, most photos first: what ``camera`` can name."""

    @property
    @abstractmethod
    def cache_key(self) -> str:
        """What tells this library from every other on the machine, for caches keyed by its file ids
        (thumbnails): ids of two libraries must not meet."""

    # -- connections -------------------------------------------------------------------------------
    @property
    def store(self) -> Any:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._open_store()
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    def close(self) -> None:
        with self._lock:
            for store in self._stores:
                with contextlib.suppress(Exception):
                    store.close()
            self._stores.clear()
        self._local = threading.local()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the model ---------------------------------------------------------------------------------
    @property
    def clip(self) -> Any:
        """The ClipModel, loaded on first use."""
        with self._lock:
            if self._clip is None:
                from clipworks.runtime.encoder import load

                if self._model_arg is not None:
                    self._clip = load(self._model_arg, **self._load_opts)
                else:
                    self._clip = load_indexed_model(self.model_row, self.where, self._load_opts)
            return self._clip

    @property
    def model_row(self) -> ModelRow:
        """The stored model whose vectors this library searches."""
        with self._lock:
            if self._row is None:
                clip = self.clip if (self._model_arg is not None or self._clip is not None) else None
                self._row = resolve_model(self.store, clip, self._model_arg, self.where)
            return self._row

    # -- queries -----------------------------------------------------------------------------------
    def query_vector(self, terms: Sequence[Term]) -> np.ndarray:
        """Encode and combine query terms (stored vectors are reused for photos already in the library)."""
        texts = query_texts(terms)
        text_vectors = self.clip.encode_texts(texts) if texts else None
        return combine_terms(terms, text_vectors, self.image_vector)

    def image_vector(self, path: str | Path) -> np.ndarray:
        """A photo's vector: the stored one when the library holds it, else the photo encoded now."""
        from clipworks.video.frames import is_video

        if is_video(path):
            raise UsageError(f"{path} is a video: search by a photo, or find its moments by text")
        stored = self.stored(str(Path(path).expanduser().resolve()))
        if stored is not None:
            return stored[1]
        if not Path(path).expanduser().is_file():
            raise UsageError(f"{path} does not exist")
        return np.asarray(self.clip.encode_images([Path(path).expanduser()])[0], np.float32)

    def search(
        self,
        query: str | Sequence[str] | None = None,
        *,
        images: Sequence[str | Path] = (),
        negatives: Sequence[str] = (),
        top_k: int = 10,
        threshold: float | None = None,
        filters: Filters | None = None,
        offset: int = 0,
        sort: SortKey = "score",
    ) -> list[Hit]:
        """Ranked (path, cosine, time) hits for a text query (``"beach -people 2:sunset"``), images, or both.

        ``filters`` (`metadata.make_filters`) choose the photos before they are ranked; ``offset`` skips
        that many of the best (the next page); ``sort="date"`` shows the page newest first (see `ranked`)."""
        words = query.split() if isinstance(query, str) else list(query or [])
        terms = parse_query(words, negatives=negatives, images=[str(i) for i in images])
        return self.search_vector(self.query_vector(terms), top_k=top_k, threshold=threshold, filters=filters,
                                  offset=offset, sort=sort)  # fmt: skip

    def similar(
        self,
        path: str | Path,
        *,
        top_k: int = 10,
        threshold: float | None = None,
        filters: Filters | None = None,
        offset: int = 0,
        sort: SortKey = "score",
    ) -> list[Hit]:
        """Photos most like ``path`` (itself left out)."""
        vector = self.image_vector(path)
        stored = self.stored(str(Path(path).expanduser().resolve()))
        return self.search_vector(vector, top_k=top_k, threshold=threshold, exclude=[stored[0]] if stored else [],
                                  filters=filters, offset=offset, sort=sort)  # fmt: skip

    def ranked(
        self,
        vector: np.ndarray,
        *,
        top_k: int = 10,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
        filters: Filters | None = None,
        offset: int = 0,
        sort: SortKey = "score",
    ) -> list[tuple[int, float]]:
        """(search key, cosine) of the photos and video moments ranked ``offset`` to ``offset + top_k`` by
        score (a key is a photo's file id, or a moment: see `store.files_of`) among those
        ``filters`` let through (chosen in SQL first, then ranked: never the top hits thinned out).
        ``sort="date"`` orders that page by capture time, newest first (photos of unknown time last), so
        pages still follow the ranking and together list each match once."""
        from clipworks.library.metadata import SORT_KEYS, parse_choice
        from clipworks.library.store import files_of

        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1, not {top_k}")
        if offset < 0:
            raise UsageError(f"--offset must be 0 or more, not {offset}")
        parse_choice(sort, SORT_KEYS, "--sort")
        out = self._rank(vector, top_k, threshold, exclude, filters, offset)
        if sort == "date":
            keys = [i for i, _ in out]
            files = dict(zip(keys, files_of(np.asarray(keys, np.int64)).tolist(), strict=True))
            times = self._local_times(list(files.values()))
            taken = {key: times.get(file_id) for key, file_id in files.items()}
            out.sort(key=lambda hit: (taken.get(hit[0]) is None, -(taken.get(hit[0]) or 0.0), -hit[1], hit[0]))
        return out

    def recent(self, *, top_k: int = 50, filters: Filters | None = None, offset: int = 0) -> list[int]:
        """Search keys of the photos and videos newest first, ``offset`` to ``offset + top_k`` of those
        ``filters`` let through: a timeline, no query needed. Capture time is compared as the wall clock
        where each was taken (as date filters do), files of one time in file id order, those of unknown time
        last; a video stands once in it, as its first moment."""
        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1, not {top_k}")
        if offset < 0:
            raise UsageError(f"--offset must be 0 or more, not {offset}")
        return self._recent(top_k, filters, offset)

    def collapse_duplicates(self, ids: Sequence[int], threshold: float = 0.95) -> dict[int, int]:
        """Each of ``ids`` (search keys, in the order shown) -> the key of the first one before it (or
        itself) whose cosine to it is at least ``threshold``: near-duplicates fold into the first shown."""
        from clipworks.library.search import first_near_duplicate

        check_cosine(threshold)
        ids = [int(i) for i in ids]
        first = first_near_duplicate(self.vectors_of(ids), threshold)
        return {i: ids[j] for i, j in zip(ids, first.tolist(), strict=True)}

    def duplicates(self, threshold: float = 0.95) -> list[list[Hit]]:
        """Groups of near-duplicate photos over the whole library (cosine >= ``threshold``). Video moments
        are left out: the moments of one shot are alike by nature, not copies."""
        from clipworks.library.search import duplicate_groups

        check_cosine(threshold)
        groups = duplicate_groups(self.photo_vectors(), threshold)
        found = self.targets([i for g in groups for i, _ in g])
        return [[Hit(found[i].path, s) for i, s in g] for g in groups]

    def file(self, file_id: int) -> FileRow | None:
        """The row of file ``file_id`` (present or deleted), None for an id the library never had."""
        return self.store.file_by_id(file_id)  # type: ignore[no-any-return]

    def file_at(self, path: str) -> FileRow | None:
        """The row of the file at ``path`` (as the library stores it), None when it was never indexed."""
        return self.store.file_by_path(path)  # type: ignore[no-any-return]

    def vector(self, file_id: int) -> np.ndarray | None:
        """The model's vector of photo ``file_id``, None when it has none (a video, an unreadable file)."""
        return self.store.vector(self.model_row, file_id)  # type: ignore[no-any-return]

    def stored(self, path: str) -> tuple[int, np.ndarray] | None:
        """(search key, vector) of the photo at the resolved ``path``, if the store has its `model_row` vector."""
        row = self.file_at(path)
        vector = None if row is None else self.vector(row.id)
        return None if vector is None else (row.id, vector)

    def targets(self, keys: Sequence[int]) -> dict[int, Target]:
        """Search key -> its photo or video moment (keys whose file or moment is gone are left out)."""
        return self.store.targets(self.model_row, keys)  # type: ignore[no-any-return]

    def export(self, out: str | Path, fmt: str | None = None) -> ExportReport:
        """Write this model's vectors to an interchange file: an ``ExportReport``."""
        from clipworks.library.interchange import export_vectors

        return export_vectors(self.store, self.model_row, out, fmt)

    def tags(self, ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
        """File id -> the (tag, score) pairs stored for it, best first (ids without tags are left out)."""
        return self.store.tags_of(ids)  # type: ignore[no-any-return]

    def metadata(self, ids: Sequence[int]) -> dict[int, Metadata]:
        """File id -> what indexing read of that photo (ids not read yet are left out)."""
        return self.store.metadata_of(ids)  # type: ignore[no-any-return]

    def search_vector(
        self,
        vector: np.ndarray,
        *,
        top_k: int = 10,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
        filters: Filters | None = None,
        offset: int = 0,
        sort: SortKey = "score",
    ) -> list[Hit]:
        ranked = self.ranked(vector, top_k=top_k, threshold=threshold, exclude=exclude, filters=filters,
                             offset=offset, sort=sort)  # fmt: skip
        found = self.targets([i for i, _ in ranked])
        return [Hit(found[i].path, s, found[i].time) for i, s in ranked if i in found]


@dataclass
class LibraryStatus:
    path: Path
    schema_version: int
    roots: list[tuple[str, list[str], int]]  # (folder, excludes, present files)
    files: int
    deleted: int  # gone from disk
    excluded: int  # still on disk but matched by an exclude now: out of search, row and vectors kept
    errors: list[tuple[str, str]]
    models: list[tuple[ModelRow, int, int]]  # (model, vectors of present files and moments, files waiting)
    search_index: str = "exact"  # what answers queries, in words
    videos: int = 0  # present videos
    moments: int = 0  # their moments, over all models


class Library(LibraryBase):
    """A library database plus the model whose vectors it searches.

    ``model`` is a loaded ``ClipModel``, a name or bundle path, or None: the one model the database
    holds vectors for (loaded from where it was indexed from, only when a query needs encoding).
    """

    def __init__(
        self,
        db: str | Path | None = None,
        model: Any = None,
        *,
        create: bool = False,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        side_file: bool = True,
        ann: AnnMode = "auto",
        ann_dtype: AnnDtype | None = None,
    ) -> None:
        from clipworks.settings import db_path

        check_ann_options(ann, ann_dtype)
        self.ann_mode: AnnMode = ann
        self.ann_dtype: AnnDtype | None = ann_dtype  # None: what the saved index has
        self._ann: tuple[Revision, AnnIndex] | None = None
        # The filterable metadata of that index's rows, the file of each row, and the per-file table they
        # come from with the revision it was read at (a change reads again only the files it touched).
        self._facets: tuple[ExactIndex, Facets, np.ndarray, FileFacets, Revision] | None = None

        self.path = Path(db).expanduser() if db is not None else db_path()
        self._init_model(model, {"device": device, "precision": precision, "threads": threads})
        self._side_file = side_file
        self._cache: MatrixCache | None = None
        self._create = create
        self.store  # noqa: B018 -- open (and create or migrate) now, so errors surface here

    # -- connections and the model (`LibraryBase`) --------------------------------------------------
    def _open_store(self) -> Store:
        return Store(self.path, create=self._create)

    @property
    def store(self) -> Store:
        return super().store  # type: ignore[no-any-return]

    @property
    def where(self) -> str:
        return str(self.path)

    def register_model(self) -> ModelRow:
        from clipworks.library.indexer import register_model

        with self._lock:
            self._row = register_model(self.store, self.clip)
            return self._row

    # -- indexing ----------------------------------------------------------------------------------
    def index(self, folders: Sequence[str | Path], **options: Any) -> IndexReport:
        """Bring ``folders`` into the library (see ``indexer.index_folders`` for the options)."""
        from clipworks.library.indexer import index_folders

        report = index_folders(self.store, self.clip, folders, **options)
        self._row = None
        if self.store.models():
            self.searcher(log=status)  # bring the approximate index up to date now, not at the first query
        return report

    def remove(self, folder: str | Path) -> int:
        from clipworks.library.indexer import remove_root

        return remove_root(self.store, folder)

    def close(self) -> None:
        # The matrix and the ANN index map side files (20 GB at 10M photos): a closed library lets go of
        # them, so a side file removed since (a newer generation replaced it) frees its disk space now.
        with self._lock:
            self._cache, self._ann, self._facets = None, None, None
        super().close()

    # -- search ------------------------------------------------------------------------------------
    def vectors(self) -> ExactIndex:
        """The current exact index of the model's vectors (rebuilt when the database changed)."""
        return self._vectors_at()[0]

    def _vectors_at(self) -> tuple[ExactIndex, Revision]:
        """`vectors`, and the revision whose vectors they are."""
        row = self.model_row
        with self._lock:
            if self._cache is None:
                self._cache = MatrixCache(self.path, row, side_file=self._side_file)
            index = self._cache.get(self.store)
            assert self._cache.key is not None
            return index, self._cache.key

    def searcher(self, log: Callable[[str], None] = lambda _m: None) -> ExactIndex | AnnIndex:
        """What answers queries: the exact index, or an approximate one with exact re-ranking when ``ann``
        says so (``auto``: from ``ANN_MIN_ROWS`` photos on). That index is opened, updated or built here."""
        exact, key = self._vectors_at()
        if not wants_ann(self.ann_mode, len(exact)):
            return exact
        with self._lock:
            # The revision of ``exact``, not the store's now: the index saved for it takes in the changes
            # logged from there on (a write committed meanwhile is the next query's to take in).
            if self._ann is None or self._ann[0] != key or self._ann[1].exact is not exact:
                from clipworks.library.search import cache_dir_for

                folder, model_id, changes = cache_dir_for(self.path), self.model_row.id, self.store.files_changed_since
                index = sync_ann(folder, key, model_id, exact, self.ann_dtype, log, changes)
                self._ann = (key, index)
            return self._ann[1]

    def _rank(
        self,
        vector: np.ndarray,
        top_k: int,
        threshold: float | None,
        exclude: Sequence[int],
        filters: Filters | None,
        offset: int,
    ) -> list[tuple[int, float]]:
        rows = self.filtered_rows(filters) if filters else None
        ids, scores = self.searcher().top_k(vector, offset + top_k, threshold, exclude, rows)
        return [(int(i), float(s)) for i, s in zip(ids[offset:], scores[offset:], strict=True)]

    def _local_times(self, file_ids: list[int]) -> dict[int, float | None]:
        return {i: m.local_time for i, m in self.metadata(file_ids).items()}

    def facets(self) -> Facets:
        """The filterable metadata of each row of the current search index (a video's moments carry the
        video's), loaded once per change."""
        return self._row_facets()[0]

    def _row_facets(self) -> tuple[Facets, np.ndarray]:
        """(`facets`, each row's file id: a photo's own, a moment's video)."""
        from clipworks.library.metadata import FileFacets
        from clipworks.library.store import files_of

        exact = self.vectors()
        with self._lock:
            if self._facets is None or self._facets[0] is not exact:
                files = files_of(exact.ids)
                with self.store.snapshot() as db:
                    revision = self.store.revision()
                    table = None
                    if self._facets is not None:
                        _, _, _, table, since = self._facets
                        changed = self.store.files_changed_since(since, max(1, len(table.ids) // 10))
                        table = None if changed is None else table.updated(db, changed)
                    if table is None:
                        table = FileFacets.read(db)
                    self._facets = (exact, table.of_rows(files), files, table, revision)
            _, facets, files, _, _ = self._facets
        return facets, files

    def filtered_rows(self, filters: Filters) -> np.ndarray:
        """The rows of the current search index that ``filters`` let through, ascending. A video's moments
        are filtered by the video's metadata and tags."""
        facets, files = self._row_facets()
        chosen = [np.flatnonzero(np.isin(files, np.asarray(ids, np.int64))) for ids in filters.chosen_ids(self.store)]
        return filters.rows(facets, chosen)

    def _timeline(self, filters: Filters | None) -> np.ndarray:
        """The rows ``filters`` let through as `recent` orders them, one per file: a photo's own row, a
        video's first moment (ordinal 0, the largest of its keys)."""
        facets, files = self._row_facets()
        keys = self.vectors().ids
        rows = self.filtered_rows(filters) if filters else np.arange(len(files))
        lead = rows[np.lexsort((-keys[rows], files[rows]))]
        _, first = np.unique(files[lead], return_index=True)
        lead = lead[first]
        local = facets.local[lead]
        return lead[np.lexsort((files[lead], -np.nan_to_num(local), np.isnan(local)))]

    def _recent(self, top_k: int, filters: Filters | None, offset: int) -> list[int]:
        rows = self._timeline(filters)
        return [int(i) for i in self.vectors().ids[rows[offset : offset + top_k]]]

    def month_counts(self, filters: Filters | None = None) -> list[tuple[str, int]]:
        local = self.facets().local[self._timeline(filters)]
        local = local[np.isfinite(local)]
        months, counts = np.unique(local.astype("datetime64[s]").astype("datetime64[M]"), return_counts=True)
        return [(str(m), int(c)) for m, c in zip(months[::-1], counts[::-1], strict=True)]

    def vectors_of(self, keys: Sequence[int]) -> np.ndarray:
        return self.vectors().vectors_of(keys)

    def photo_vectors(self) -> ExactIndex:
        exact = self.vectors()
        photos = int(np.searchsorted(exact.ids, 1))  # moment keys are negative: they sort first
        return ExactIndex(exact.ids[photos:], exact.matrix[photos:])

    def key_counts(self) -> tuple[int, int]:
        keys = self.vectors().ids
        moments = int(np.count_nonzero(keys < 0))  # moment keys are negative (`store.files_of`)
        return len(keys) - moments, moments

    def folders(self) -> list[str]:
        return [root for root, _ in self.store.roots()]

    @property
    def cache_key(self) -> str:
        return str(self.path.resolve())

    def cameras(self) -> list[tuple[str, int]]:
        from clipworks.library.metadata import camera_counts

        return camera_counts(self.store.conn)

    def write_tags(self, tagged: Sequence[tuple[str | Path, Sequence[tuple[str, float]]]]) -> list[str]:
        """Store each photo's (tag, score) pairs in place of its old ones; returns the paths that are not
        in the library (nothing is stored for those: index them first)."""
        ids: dict[int, Sequence[tuple[str, float]]] = {}
        missing = []
        for path, tags in tagged:
            row = self.store.file_by_path(str(Path(path).expanduser().resolve()))
            if row is None or row.deleted_at is not None:
                missing.append(str(path))
            else:
                ids[row.id] = tags
        if ids:
            self.store.replace_tags(ids)
        return missing

    # -- bookkeeping -------------------------------------------------------------------------------
    def status(self) -> LibraryStatus:
        from clipworks.library.indexer import pending
        from clipworks.library.scan import excluded_path
        from clipworks.library.store import TEXT_ARG, prefix_range, to_bytes

        store = self.store
        with store.snapshot() as db:
            roots = []
            for root, excludes in store.roots():
                low, high = prefix_range(root)
                count = db.execute(
                    f"SELECT COUNT(*) FROM files WHERE path >= {TEXT_ARG} AND path < {TEXT_ARG} AND deleted_at IS NULL",
                    (to_bytes(low), to_bytes(high)),
                ).fetchone()[0]
                roots.append((root, excludes, count))
            files = db.execute("SELECT COUNT(*) FROM files WHERE deleted_at IS NULL").fetchone()[0]
            out_of_search = db.execute("SELECT COUNT(*) FROM files WHERE deleted_at IS NOT NULL").fetchone()[0]
            # Both kinds of row are out of search; which is which follows from the excludes, as in the index run.
            excluded = 0
            for root, excludes, _ in roots:
                if excludes:
                    low, high = prefix_range(root)
                    gone = db.execute(
                        f"SELECT path FROM files WHERE path >= {TEXT_ARG} AND path < {TEXT_ARG} "
                        "AND deleted_at IS NOT NULL",
                        (to_bytes(low), to_bytes(high)),
                    )
                    excluded += sum(excluded_path(root, path, excludes) for (path,) in gone)
            errors = db.execute(
                "SELECT path, error FROM files WHERE error IS NOT NULL AND deleted_at IS NULL ORDER BY path"
            ).fetchall()
            models = []
            for row in store.models():
                vectors = db.execute(
                    "SELECT (SELECT COUNT(*) FROM embeddings e JOIN files f ON f.id = e.file_id "
                    "WHERE e.model_id = ?1 AND f.deleted_at IS NULL) + (SELECT COUNT(*) FROM moments m "
                    "JOIN files f ON f.id = m.file_id WHERE m.model_id = ?1 AND f.deleted_at IS NULL)",
                    (row.id,),
                ).fetchone()[0]
                models.append((row, vectors, len(pending(store, row, [r for r, _, _ in roots]))))
            videos, moments = db.execute(
                "SELECT COUNT(*), coalesce(SUM((SELECT COUNT(*) FROM moments m WHERE m.file_id = f.id)), 0) "
                "FROM files f WHERE f.deleted_at IS NULL AND f.kind = 'video'"
            ).fetchone()
        return LibraryStatus(
            self.path,
            store.version,
            roots,
            files,
            out_of_search - excluded,
            excluded,
            errors,
            models,
            self._search_index_summary(models),
            videos,
            moments,
        )

    def _search_index_summary(self, models: list[tuple[ModelRow, int, int]]) -> str:
        """Which index answers queries, in words (``index status``); reads the saved state, builds nothing."""
        from clipworks.library.ann import describe_ann
        from clipworks.library.search import cache_dir_for

        vectors = models[0][1] if len(models) == 1 else 0
        if not wants_ann(self.ann_mode, vectors):
            return "exact (ann off)" if self.ann_mode == "off" else f"exact (below {ANN_MIN_ROWS} photos)"
        key = self.store.revision()
        return describe_ann(cache_dir_for(self.path), key, models[0][0].id, self.ann_dtype, vectors)

    def import_file(self, file: str | Path, fmt: str | None = None) -> Any:
        """Import vectors made by this library's model (the model is registered when new)."""
        from clipworks.library.interchange import import_vectors

        row = self.register_model() if (self._model_arg is not None or self._clip is not None) else self.model_row
        return import_vectors(self.store, row, file, fmt)
