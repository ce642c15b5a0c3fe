"""Where the photos of each identity are, for one folder or a whole dataset; sharding across processes.

Accepted layouts (documented in ``docs/evaluate.md``):

* one identity: a plain folder of photos;
* a plain dataset: ``ROOT/<identity>/`` folders of photos;
* the Anti-DreamBooth dataset: ``ROOT/<identity>/set_A`` (clean photos for the surrogate), ``set_B``
  (the photos to protect) and ``set_C`` (clean references), read as is.

Protected outputs (``dladiff protect --dataset``) are a plain dataset: ``OUT/<identity>/*.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, TypeVar

from dladiff.data import IMAGE_SUFFIXES
from dladiff.errors import InputError

SET_SURROGATE, SET_PROTECT, SET_REFERENCE = "set_A", "set_B", "set_C"

Layout = Literal["identity", "plain", "anti-dreambooth"]
T = TypeVar("T")


@dataclass(frozen=True)
class IdentityFolders:
    """One identity for evaluation.

    ``photos``: what the attacker gets (protected photos, or clean ones for the "w/o Protect" row);
    ``clean``: the clean originals of those photos (PSNR/SSIM and ISM_pro pairs, FID reference);
    ``references``: clean photos whose mean embedding ISM compares to (``set_C`` when present).
    """

    name: str
    photos: Path
    clean: Path
    references: Path


def image_files(folder: Path) -> list[Path]:
    """Image files of ``folder`` (known suffixes, not hidden, not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def is_anti_dreambooth_identity(folder: Path) -> bool:
    """True for an Anti-DreamBooth identity folder (it has ``set_B/``)."""
    return (Path(folder) / SET_PROTECT).is_dir()


def photos_folder(identity_dir: Path) -> Path:
    """The photos to protect or attack of an identity folder: ``set_B/`` or the folder itself."""
    identity_dir = Path(identity_dir)
    return identity_dir / SET_PROTECT if is_anti_dreambooth_identity(identity_dir) else identity_dir


def reference_folder(identity_dir: Path) -> Path:
    """Clean references of an identity folder: ``set_C/`` when present, else its photos."""
    identity_dir = Path(identity_dir)
    ref = identity_dir / SET_REFERENCE
    return ref if image_files(ref) else photos_folder(identity_dir)


def surrogate_folder(identity_dir: Path) -> Path | None:
    """Anti-DreamBooth's ``set_A/`` (clean photos for the static surrogate), or None."""
    folder = Path(identity_dir) / SET_SURROGATE
    return folder if image_files(folder) else None


def identity_names(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold photos (directly or in ``set_B/``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and image_files(photos_folder(d)))


def detect_layout(root: Path) -> Layout:
    """``identity`` (photos in ``root``), ``plain`` (``root/<id>/``) or ``anti-dreambooth`` (``root/<id>/set_B``)."""
    root = Path(root)
    names = identity_names(root)
    if names:
        return "anti-dreambooth" if any(is_anti_dreambooth_identity(root / n) for n in names) else "plain"
    if image_files(root) or image_files(root / SET_PROTECT):
        return "identity"
    raise InputError(f"{root}: no photos found (neither in the folder, nor in <identity>/ or <identity>/set_B/ sub-folders)")


def single_identity(photos: Path, clean: Path) -> IdentityFolders:
    """One identity: ``photos`` attacked, ``clean`` its originals (either may be an Anti-DreamBooth folder)."""
    photos, clean = Path(photos), Path(clean)
    photo_dir = photos_folder(photos)
    if not image_files(photo_dir):
        raise InputError(f"{photos}: no photos found")
    if not image_files(photos_folder(clean)):
        raise InputError(f"--clean {clean}: no photos found")
    return IdentityFolders(photos.name, photo_dir, photos_folder(clean), reference_folder(clean))


def dataset_identities(photos_root: Path, clean_root: Path) -> list[IdentityFolders]:
    """Identities present in both roots, sorted by name; raises when none is shared."""
    photos_root, clean_root = Path(photos_root), Path(clean_root)
    attacked = identity_names(photos_root)
    clean = set(identity_names(clean_root))
    shared = [n for n in attacked if n in clean]
    if not shared:
        raise InputError(f"no identity folder of {photos_root} has a clean counterpart in {clean_root}")
    return [
        IdentityFolders(n, photos_folder(photos_root / n), photos_folder(clean_root / n), reference_folder(clean_root / n))
        for n in shared
    ]


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items of process ``index`` of ``count``: item i goes to process i % count."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} of {count} processes")
    return list(items[index::count])
