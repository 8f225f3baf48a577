"""Manifests: which images a dataset holds, in order, from a folder or a CSV or Parquet table.

A manifest is a DataFrame with one row per image in dataset order: `image_id` (the path relative
to the dataset root, `/`-separated, always valid UTF-8), `path` (where to read it, exactly as the
OS names it, so of object dtype: it may not be UTF-8), `error` (why the image cannot be used,
when listing it already tells; missing otherwise) and, when known, `label` (a string, or None
for an image whose label is missing). This module owns listing them (`load_manifest`,
`folder_manifest`, `table_manifest`), the label column (`labels`), the checks that keep paths
inside the dataset root, and writing the demo data set where dataset=demo asks for it
(`build_demo_if_missing`). It reads no image: that is `formats` and `decode`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import DatasetConfig, DatasetKind
from pipeline.errors import ConfigError

# pandas is imported where a manifest is made: `check_dataset` runs before the model's
# libraries load, for a config error in a second.
if TYPE_CHECKING:
    import pandas as pd


def build_demo_if_missing(dataset: DatasetConfig) -> None:
    """For dataset=demo, write the demo data set under `dataset.root` unless a complete one is
    there already, so that a first `python -m pipeline` needs no step before it; nothing for
    another kind of dataset. The extraction calls it before `load_manifest`, which only reads."""
    if dataset.kind is DatasetKind.demo:
        from pipeline.images import demo  # only the demo needs scikit-image and scikit-learn

        demo.ensure(Path(dataset.root))


def check_dataset(dataset: DatasetConfig) -> None:
    """What `load_manifest` checks before it reads anything: the root is a folder, a manifest
    file is there (dataset=demo is built when missing). The command runs it first, before the
    model's libraries load."""
    if dataset.kind is DatasetKind.demo:
        return
    _existing_dir(dataset.root)
    if dataset.kind is not DatasetKind.folder:
        _existing_manifest(Path(dataset.path).expanduser())


def load_manifest(dataset: DatasetConfig) -> pd.DataFrame:
    """The images of a dataset, in the order they will be written. Writes nothing: the demo
    data set is built by `build_demo_if_missing`."""
    if dataset.kind is DatasetKind.folder:
        return folder_manifest(
            _existing_dir(dataset.root),
            dataset.extensions,
            dataset.labels_from_folders,
            allow_outside_root=dataset.allow_outside_root,
        )
    if dataset.kind is DatasetKind.demo and not Path(dataset.path).expanduser().is_file():
        raise ConfigError(
            f"the demo data set is not built in {dataset.root}: "
            f"python -m pipeline.images.demo {dataset.root} builds it"
        )
    return table_manifest(
        Path(dataset.path).expanduser(),
        _existing_dir(dataset.root),
        dataset.path_column,
        dataset.label_column,
        dataset.allow_outside_root,
    )


def folder_manifest(
    root: Path,
    extensions: Sequence[str],
    labels_from_folders: bool | str,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """Every entry under `root` named with one of `extensions`, recursively, sorted by id;
    labelled by the name of the folder each sits in when `labels_from_folders` is true, or
    "auto" and every entry sits in a sub-folder (`folder_labels`).

    What cannot be an image is listed all the same, so that it becomes a failure row with its
    reason instead of vanishing: a folder named x.jpg, a FIFO, a broken symlink or a symlink
    loop fail when read; a name that is not UTF-8, a symlink whose target leaves the root
    (unless `allow_outside_root`) and a subfolder that cannot be listed carry their reason in
    the `error` column. Files with other extensions are counted in `manifest.attrs["skipped"]`
    (extension -> count) for the caller to report, and so are symlinked folders, which are not
    entered (a loop cannot trap the walk; list their images in a manifest instead).
    """
    suffixes = {e.lower() for e in extensions}
    real_root = os.path.realpath(root)
    real_dirs: dict[str, str] = {}
    found: dict[str, str | None] = {}  # relative path -> error
    skipped: Counter[str] = Counter()
    pending = [(str(root), "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            if not prefix:
                raise ConfigError(f"dataset.root {root} cannot be listed: {err.strerror}") from None
            found[prefix.rstrip("/")] = f"cannot list this folder: {err.strerror}"
            continue
        for entry in entries:
            relative = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir:
                pending.append((entry.path, relative + "/"))
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in suffixes:
                outside = (
                    entry.is_symlink()
                    and not allow_outside_root
                    and _outside_root(entry.path, real_root, real_dirs)
                )
                found.setdefault(relative, _outside_root_error(outside) if outside else None)
            elif entry.is_symlink() and entry.is_dir():
                skipped["(symlinked folder)"] += 1
            elif not is_dir:
                skipped[suffix or "(no extension)"] += 1
    if not found:
        raise ConfigError(
            f"no images ({', '.join(sorted(suffixes))}) under {root}: "
            "check dataset.root or dataset.extensions"
        )
    import pandas as pd

    rows = sorted(((*_utf8_id(r, e), r) for r, e in found.items()), key=lambda row: row[0])
    manifest = pd.DataFrame(
        {
            "image_id": [i for i, _, _ in rows],
            "path": pd.Series([str(root / r) for _, _, r in rows], dtype=object),
            "error": [e for _, e, _ in rows],
        }
    )
    if folder_labels(labels_from_folders, manifest["image_id"]):
        manifest["label"] = [Path(i).parent.name for i, _, _ in rows]
    manifest.attrs["skipped"] = dict(sorted(skipped.items()))
    return manifest


def folder_labels(labels_from_folders: bool | str, image_ids: Iterable[str]) -> bool:
    """Whether a folder's images are labelled by their folder: as `labels_from_folders` says,
    and for "auto" when every image sits in a sub-folder of the root (the usual layout of a
    labelled set, `cats/1.jpg`, `dogs/2.jpg`); one image at the top level, and none is."""
    if labels_from_folders == "auto":
        return all("/" in image_id for image_id in image_ids)
    return bool(labels_from_folders)


def table_manifest(
    path: Path,
    root: Path,
    path_column: str,
    label_column: str | None,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """A CSV or Parquet manifest with a path column (relative to `root`) and an optional label.

    A path that leaves `root`, by `..` or through a symlink, is refused unless
    `allow_outside_root`, and its id is then its absolute path: `..` refuses the whole manifest
    (a wrong root, most likely), a symlink only its own row. A name that is not valid UTF-8
    (a CSV in another encoding, a binary Parquet column) gets a readable id and a failure row.
    """
    import pandas as pd

    _existing_manifest(path)
    table = _read_table(path)
    if table.empty:
        raise ConfigError(f"manifest {path} lists no images: check dataset.path")
    wanted = [c for c in (path_column, label_column) if c is not None]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ConfigError(
            f"manifest {path} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {list(table.columns)}: set dataset.path_column / "
            "dataset.label_column"
        )
    names = [os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in table[path_column]]
    relative = [_image_id(name, root, allow_outside_root) for name in names]
    real_root, real_dirs = os.path.realpath(root), {}
    ids, errors = [], []
    for name in relative:
        outside = not allow_outside_root and _outside_root(str(root / name), real_root, real_dirs)
        image_id, error = _utf8_id(name, _outside_root_error(outside) if outside else None)
        ids.append(image_id)
        errors.append(error)
    paths = pd.Series([str(root / r) for r in relative], dtype=object)
    manifest = pd.DataFrame({"image_id": ids, "path": paths, "error": errors})
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(duplicated):
        raise ConfigError(
            f"manifest {path} lists {duplicated.iloc[0]!r} more than once "
            f"({len(duplicated)} repeats): each image may appear once"
        )
    if label_column is not None:
        manifest["label"] = labels(table[label_column], manifest.index)
    return manifest


def labels(values: Iterable[Any], index: pd.Index) -> pd.Series:
    """A manifest's `label` column (on `index`) as the Parquet files hold it: strings, valid
    UTF-8 (bytes that are not are escaped, as ids are), None where a label is missing (an empty
    CSV cell, a null, NaN). Of object dtype: pandas would infer `str` and make None a NaN."""
    import pandas as pd

    return pd.Series(
        [None if pd.isna(label) else _utf8_id(str(label), None)[0] for label in values],
        index=index,
        dtype=object,
    )


PARQUET_MAGIC = b"PAR1"


def _read_table(path: Path) -> pd.DataFrame:
    """A manifest file: Parquet (by its suffix or its first bytes), else CSV; anything else is
    a config error naming the file."""
    import pandas as pd

    try:
        with path.open("rb") as file:
            parquet = path.suffix in (".parquet", ".pq") or file.read(4) == PARQUET_MAGIC
    except OSError as err:
        raise ConfigError(f"manifest {path} cannot be read: {err.strerror}") from None
    if parquet:
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            reason = str(err).splitlines()[0]
            raise ConfigError(
                f"manifest {path} is not a readable Parquet file ({reason}): check dataset.path"
            ) from None
    try:
        # Undecodable bytes stay as surrogates: they name files on disk in another encoding.
        return pd.read_csv(path, dtype=object, encoding_errors="surrogateescape")
    except pd.errors.EmptyDataError:
        raise ConfigError(f"manifest {path} is empty: check dataset.path") from None
    except (pd.errors.ParserError, UnicodeError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"manifest {path} cannot be read as CSV or Parquet ({reason}): check dataset.path"
        ) from None


def _image_id(path: str, root: Path, allow_outside_root: bool) -> str:
    # Lexical normalisation: `..` may not climb out; symlinks are _outside_root's to judge.
    absolute = Path(os.path.abspath(root / path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        if allow_outside_root:
            return absolute.as_posix()
        raise ConfigError(
            f"manifest path {path!r} lies outside dataset.root ({root}): give paths relative "
            "to the root, or set dataset.allow_outside_root=true"
        ) from None


def _outside_root(path: str, real_root: str, real_dirs: dict[str, str]) -> str | None:
    """Where `path` really leads if that is outside `real_root`, else None.

    Folders are resolved once each (`real_dirs` caches them) and the file itself only when it
    is a symlink: one lstat per image, not one per path component.
    """
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    real = os.path.join(real_dirs[folder], name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    return None if os.path.commonpath([real, real_root]) == real_root else real


def _outside_root_error(target: str) -> str:
    return (
        f"symlink points outside dataset.root (to {target}): "
        "set dataset.allow_outside_root=true to read it"
    )


def _utf8_id(name: str, error: str | None) -> tuple[str, str | None]:
    """`name` and `error`; for a name that is not valid UTF-8 (its undecodable bytes arrive as
    surrogates), the name with those bytes backslash-escaped, and a failure. Parquet, CSV and
    the trackers all need UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        escaped = os.fsencode(name).decode("utf-8", "backslashreplace")
        return escaped, "file name is not valid UTF-8: rename it"
    return name, error


def _existing_manifest(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist: check dataset.path")


def _existing_dir(root: str | None) -> Path:
    if root is None:
        raise ConfigError("dataset.root is not set: dataset.root=/path/to/images")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"dataset.root {path} is not a folder: check the path")
    return path
