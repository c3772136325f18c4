"""The shard format (format_version 1), shared by pack, the loaders, train, predict and inspect.

OUT/
  manifest.json            written last: counts, shards with sha256, pixel mean/std, skipped
  {split}-{NNNNNN}.tar     WebDataset shards, split in train|val|test|eval
  {split}-{NNNNNN}.idx     DALI `fn.readers.webdataset` index (the format `wds2idx` writes, v1.2)

Each sample, in this member order, under a KEY with no dot (10 digits, see `sample_key`):
  KEY.jpg      the source JPEG's bytes, unchanged
  KEY.json     {"key", "sid", "id", "version", "split", "source", "width", "height", "uv", ["xyz", "K"]}
  KEY.kp.f32   uv as 42 little-endian float32 (x0, y0, x1, y1, ...), source-image pixels
  KEY.sid.i64  the sample id as one little-endian int64 (KEY == f"{sid:010d}"), so readers that
               cannot carry strings (DALI) can still report keys
Only these members are ever decoded; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handpose.errors import HandposeError
from handpose.skeleton import NUM_JOINTS

FORMAT_NAME = "handpose-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test", "eval")
MEMBERS = ("jpg", "json", "kp.f32", "sid.i64")
EVAL_SID_OFFSET = 1_000_000_000  # evaluation-set keys: FreiHAND file number + this offset


def sample_key(sid: int) -> str:
    """The stable, dot-free key of sample id `sid` (FreiHAND file number; eval offset by 1e9)."""
    return f"{sid:010d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def encode_keypoints(uv: np.ndarray) -> bytes:
    """(21, 2) pixels -> 42 little-endian float32."""
    return np.asarray(uv, dtype="<f4").reshape(NUM_JOINTS * 2).tobytes()


def decode_keypoints(data: bytes) -> np.ndarray:
    """42 little-endian float32 -> (21, 2) float32."""
    if len(data) != NUM_JOINTS * 2 * 4:
        raise ValueError(f"keypoint member has {len(data)} bytes, expected {NUM_JOINTS * 8}")
    return np.frombuffer(data, dtype="<f4").reshape(NUM_JOINTS, 2).astype(np.float32)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file (mode 0644, uid/gid 0, mtime 0, no owner names).

    Byte-identical to what Python 3.11's `tarfile` writes for the same TarInfo, built directly:
    tarfile's general header code cost more per sample than decoding the JPEG, and its bytes
    have changed between Python versions (device fields), which shards must not.
    """
    name_b = name.encode("utf-8")
    if len(name_b) > 100 or not 0 <= size < 8**11:
        raise ValueError(f"member {name!r} ({size} bytes) does not fit a ustar header")
    head = name_b.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    # type '0', empty link name, magic + version, empty owner names, device fields and prefix
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 155)
    checksum = sum(head) + sum(tail) + 8 * ord(" ")  # computed with the checksum field as 8 spaces
    return (head + b"%06o\0 " % checksum + tail).ljust(tarfile.BLOCKSIZE, b"\0")


class ShardWriter:
    """Writes one tar deterministically (fixed mtime/owner/mode, ustar) plus its DALI index.

    Offsets for the index are recorded as members are written, so no second pass (and no `tar`
    subprocess) is needed. Write to temporary paths; the caller renames both when complete.
    The bytes equal those of `tarfile` in ustar format (header, data padded to 512, two zero
    blocks, padding to tarfile's 10240-byte record).
    """

    def __init__(self, tar_path: Path, idx_path: Path):
        self.tar_path, self.idx_path = tar_path, idx_path
        self._f = open(tar_path, "wb")
        self._offset = 0
        self._index: list[str] = []
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; `members` maps extension (e.g. 'kp.f32') to bytes, in order."""
        parts = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            pad = -len(data) % tarfile.BLOCKSIZE
            self._f.write(ustar_header(name, len(data)))
            self._f.write(data)
            self._f.write(b"\0" * pad)
            offset = self._offset + tarfile.BLOCKSIZE  # data follows one 512-byte header
            self._offset = offset + len(data) + pad
            parts.append(f"{ext} {offset} {len(data)} {name}")
        self._index.append(" ".join(parts))
        self.samples += 1

    def close(self) -> None:
        end = self._offset + 2 * tarfile.BLOCKSIZE  # end-of-archive marker: two zero blocks
        self._f.write(b"\0" * (end - self._offset + (-end % tarfile.RECORDSIZE)))
        self._f.close()
        with open(self.idx_path, "w", encoding="ascii") as f:
            f.write(f"v1.2 {len(self._index)}\n")
            f.write("".join(line + "\n" for line in self._index))

    def abort(self) -> None:
        self._f.close()


IndexEntry = tuple[str, dict[str, tuple[int, int]]]  # key, {ext: (offset, size)} of each member


def read_index(path: str | Path) -> list[IndexEntry]:
    """Parse a shard's DALI index (v1.2: one line per sample, `ext offset size name` per member).

    The one reader of the format `ShardWriter` writes; the samples come in tar order. Raises
    FileNotFoundError when there is no index, HandposeError naming the line when it is malformed.
    """
    with open(path, encoding="ascii") as f:
        header = f.readline().split()
        lines = f.read().splitlines()
    if len(header) != 2 or header[0] != "v1.2" or header[1] != str(len(lines)):
        raise HandposeError(f"{path}: bad index header {' '.join(header)!r} (expected 'v1.2 {len(lines)}')")
    entries: list[IndexEntry] = []
    for n, line in enumerate(lines, 2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise HandposeError(f"{path}:{n}: malformed index line")
        members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        entries.append((fields[3].partition(".")[0], members))
    return entries


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of a shards folder."""

    root: Path
    data: dict[str, Any]

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the training split's pixels, RGB in [0, 1]."""
        return tuple(self.data["stats"]["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.data["stats"]["std"])  # type: ignore[return-value]

    def count(self, split: str) -> int:
        return int(self.data["counts"].get(split, 0))

    def shards(self, split: str) -> list[Path]:
        """Absolute paths of a split's shards, in order."""
        return [self.root / s["name"] for s in self.data["shards"] if s["split"] == split]

    def shard_samples(self, split: str) -> list[int]:
        return [int(s["samples"]) for s in self.data["shards"] if s["split"] == split]


def read_manifest(root: str | Path) -> Manifest:
    """Read OUT/manifest.json; a clear error if the folder is not a complete handpose pack."""
    root = Path(root)
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HandposeError(
            f"{root}: no {MANIFEST} (not a packed shards folder, or packing did not finish)"
        ) from None
    except json.JSONDecodeError as e:
        raise HandposeError(f"{path}: unreadable manifest: {e}") from None
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        raise HandposeError(
            f"{path}: format {data.get('format')!r} v{data.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return Manifest(root=root, data=data)


def split_shards(root: str | Path, split: str) -> tuple[Manifest, list[Path]]:
    """Manifest and the shard paths of `split`, or a clear error if the split is empty."""
    m = read_manifest(root)
    shards = m.shards(split)
    if not shards:
        have = sorted({s["split"] for s in m.data["shards"]})
        raise HandposeError(f"{root}: no shards for split {split!r} (have: {', '.join(have) or 'none'})")
    return m, shards
