"""The shard format (format_version 3): its writer, its ONE reader, and the manifest.

Every stage that touches shards (pack, both loader kinds, train, predict, inspect, bench) goes
through this module; nothing else opens a shard's tar.

OUT/
  manifest.json            written last: counts, shards with size and sha256 (and their index's),
                           pixel mean/std, mean pose, box statistics, skipped samples
  {split}-{NNNNNN}.tar     WebDataset shards, split in train|val|test|eval
  {split}-{NNNNNN}.idx     DALI `fn.readers.webdataset` index (the format `wds2idx` writes, v1.2)

Each sample is ONE hand, in this member order, under a KEY with no dot (`sample_key(sid)`):
  KEY.jpg      the source JPEG's bytes, unchanged (a photo with three hands is stored three times)
  KEY.json     {"key", "sid", "id", "hand", "version", "split", "source", "width", "height",
                "uv", "visibility", "box", ["xyz", "K"] (FreiHAND), ["image_id"] (COCO),
                ["label", "class"] (YOLO: "labels/a.txt:3", the line's class)}
  KEY.kp.f32   uv as 42 little-endian float32 (x0, y0, x1, y1, ...), source-image pixels
  KEY.vis.u8   21 uint8 visibilities as labelled (0 = not labelled; COCO's 1/2 kept as given)
  KEY.box.f32  the hand box as 4 little-endian float32 (x0, y0, x1, y1), source-image pixels
  KEY.sid.i64  the sample id as one little-endian int64 (KEY == f"{sid:010d}"), so readers that
               cannot carry strings (DALI) can still report keys
"Source-image pixels" are those of the image as displayed (EXIF orientation applied), in the
pixel convention of geometry.py. Only these members are ever decoded; nothing is unpickled.
Version 1 (no vis/box members, one sample per image) is refused with "re-pack". Version 3 adds
to each shard entry a sha256 per `block_bytes` of the tar (`block_sha256`), so that part of a tar
read from a URL can be checked on its own (remote.py); v2 packs still read from a folder, and from
a URL through a cache. A shards location is a folder or a URL (`read_manifest`, `split_shards`,
`read_samples` hand a URL to remote.py).

Trust: `read_manifest` checks the manifest against `MANIFEST_SCHEMA` (one line per problem,
naming the key path) and that its counts agree with its shards; `split_shards`, through which
every consumer opens a split, checks each shard's size against the manifest; `verify_shards`
(predict, inspect, bench) and `datasets.verify_sets` (train, spread over ranks) check the sha256s
unless the user opts out (--no-verify); `handpose verify` (verify.py) checks everything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from handpose import schema
from handpose.errors import HandposeError
from handpose.skeleton import NUM_JOINTS

if TYPE_CHECKING:
    from handpose.remote import Cache, Location, Store

FORMAT_NAME = "handpose-shards"
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)  # v2: no per-block digests (read from a folder, or from a URL via a cache)
BLOCK_BYTES = 1 << 20  # v3: pack records a sha256 per MiB of each tar (`block_sha256`)
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test", "eval")
MEMBERS = ("jpg", "json", "kp.f32", "vis.u8", "box.f32", "sid.i64")
# the members of a fixed size, in bytes
MEMBER_BYTES = {"kp.f32": NUM_JOINTS * 2 * 4, "vis.u8": NUM_JOINTS, "box.f32": 4 * 4, "sid.i64": 8}
EVAL_SID_OFFSET = 1_000_000_000  # evaluation-set keys: FreiHAND file number + this offset


def sample_key(sid: int) -> str:
    """The stable, dot-free key of sample id `sid` (FreiHAND file number; eval offset by 1e9)."""
    return f"{sid:010d}"


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of `split` (`train-000003.tar`)."""
    return f"{split}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    """The DALI index beside a shard (`train-000003.idx`)."""
    return tar_name[: -len(".tar")] + ".idx"


_SHARD_FILE = re.compile(rf"^(?:{'|'.join(SPLITS)})-\d{{6}}\.(?:tar|idx)$")


def is_shard_file(name: str) -> bool:
    """Whether `name` is a shard or an index as `shard_name` and `index_name` name them."""
    return _SHARD_FILE.match(name) is not None


def encode_keypoints(uv: np.ndarray) -> bytes:
    """(21, 2) pixels -> 42 little-endian float32."""
    return np.asarray(uv, dtype="<f4").reshape(NUM_JOINTS * 2).tobytes()


def decode_keypoints(data: bytes) -> np.ndarray:
    """42 little-endian float32 -> (21, 2) float32."""
    if len(data) != NUM_JOINTS * 2 * 4:
        raise ValueError(f"keypoint member has {len(data)} bytes, expected {NUM_JOINTS * 8}")
    return np.frombuffer(data, dtype="<f4").reshape(NUM_JOINTS, 2).astype(np.float32)


def encode_visibility(visibility: np.ndarray) -> bytes:
    """(21,) visibilities (0 = not labelled) -> 21 uint8."""
    return np.asarray(visibility, dtype=np.uint8).reshape(NUM_JOINTS).tobytes()


def decode_visibility(data: bytes) -> np.ndarray:
    """21 uint8 -> (21,) uint8."""
    if len(data) != NUM_JOINTS:
        raise ValueError(f"visibility member has {len(data)} bytes, expected {NUM_JOINTS}")
    return np.frombuffer(data, dtype=np.uint8).copy()


def encode_box(box: np.ndarray) -> bytes:
    """(x0, y0, x1, y1) pixels -> 4 little-endian float32."""
    return np.asarray(box, dtype="<f4").reshape(4).tobytes()


def decode_box(data: bytes) -> np.ndarray:
    """4 little-endian float32 -> (4,) float32 (x0, y0, x1, y1)."""
    if len(data) != 16:
        raise ValueError(f"box member has {len(data)} bytes, expected 16")
    box = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not (np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"box member {box.tolist()} is not a box (x0 < x1, y0 < y1, finite)")
    return box


def encode_sid(sid: int) -> bytes:
    return np.array([sid], dtype="<i8").tobytes()


def sample_members(
    jpg: bytes, meta: dict[str, Any], uv: np.ndarray, visibility: np.ndarray, box: np.ndarray, sid: int
) -> dict[str, bytes]:
    """One sample's members in the order of MEMBERS (what `ShardWriter.write` takes)."""
    return {
        "jpg": jpg,
        "json": json.dumps(meta, separators=(",", ":")).encode(),
        "kp.f32": encode_keypoints(uv),
        "vis.u8": encode_visibility(visibility),
        "box.f32": encode_box(box),
        "sid.i64": encode_sid(sid),
    }


# The constant fields of the headers ShardWriter writes: mode 0644, uid/gid 0, then (after the
# size) mtime 0; type '0', empty link name, magic + version, empty owner names, device fields and
# prefix. Their byte sum, and the checksum field counted as 8 spaces, start every checksum.
_USTAR_IDS = b"0000644\0" + b"0000000\0" * 2
_USTAR_MTIME = b"00000000000\0"
_USTAR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 155)
_USTAR_PAD = b"\0" * (tarfile.BLOCKSIZE - 500)
_USTAR_SUM = sum(_USTAR_IDS) + sum(_USTAR_MTIME) + sum(_USTAR_TAIL) + 8 * ord(" ")


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file (mode 0644, uid/gid 0, mtime 0, no owner names).

    Byte-identical to what Python 3.11's `tarfile` writes for the same TarInfo, built directly
    from its constant fields: tarfile's general header code cost more per sample than decoding
    the JPEG, and its bytes have changed between Python versions (device fields), which shards
    must not.
    """
    name_b = name.encode("utf-8")
    if len(name_b) > 100 or not 0 <= size < 8**11:
        raise ValueError(f"member {name!r} ({size} bytes) does not fit a ustar header")
    size_b = b"%011o\0" % size
    checksum = _USTAR_SUM + sum(name_b) + sum(size_b)
    return b"".join(
        (
            name_b.ljust(100, b"\0"),
            _USTAR_IDS,
            size_b,
            _USTAR_MTIME,
            b"%06o\0 " % checksum,
            _USTAR_TAIL,
            _USTAR_PAD,
        )
    )


_ZEROS = b"\0" * tarfile.BLOCKSIZE  # a member's padding is a prefix of it


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
        parts: list[str] = []
        blocks: list[bytes] = []
        offset = self._offset
        for ext, data in members.items():
            name = f"{key}.{ext}"
            pad = -len(data) % tarfile.BLOCKSIZE
            blocks += (ustar_header(name, len(data)), data, _ZEROS[:pad])
            offset += tarfile.BLOCKSIZE  # data follows one 512-byte header
            parts.append(f"{ext} {offset} {len(data)} {name}")
            offset += len(data) + pad
        self._f.write(b"".join(blocks))  # one write per sample: 18 small ones cost more than the copy
        self._offset = offset
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
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise HandposeError(f"{path}: not a DALI index (not ASCII text); re-run handpose pack") from None
    return parse_index(text, str(path))


def parse_index(text: str, path: str) -> list[IndexEntry]:
    """The entries of an index's text (`path` names it in errors); see `read_index`."""
    first, _, rest = text.partition("\n")
    header, lines = first.split(), rest.splitlines()
    if len(header) != 2 or header[0] != "v1.2" or header[1] != str(len(lines)):
        raise HandposeError(f"{path}: bad index header {' '.join(header)!r} (expected 'v1.2 {len(lines)}')")
    entries: list[IndexEntry] = []
    for n, line in enumerate(lines, 2):
        fields = line.split()
        try:
            if not fields or len(fields) % 4:
                raise ValueError
            members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        except ValueError:
            raise HandposeError(f"{path}:{n}: malformed index line") from None
        entries.append((fields[3].partition(".")[0], members))
    return entries


Sample = dict[str, Any]  # {"__key__": KEY, "__url__": shard path, EXT: member bytes, ...}


def read_samples(
    tar: str | Path | Location,
    exts: Sequence[str],
    start: int = 0,
    stop: int | None = None,
    *,
    store: Store | None = None,
) -> Iterator[Sample]:
    """Samples [start, stop) of one shard in tar order, each with the members `exts` as bytes.

    THE shard reader. With the shard's `.idx` (every pack writes one) each member is one `pread`
    at its offset; without it the tar is streamed (same order, so positions agree). Members not
    in `exts` are never read; a sample lacking one of them simply lacks the key (the caller
    decides whether that is an error). An unreadable shard raises HandposeError naming it.
    A shard of a remote pack (`store`: its `Manifest.store`) is read by `remote.Store`, each
    sample only after its bytes matched the manifest.
    """
    if store is not None:
        yield from store.read_samples(str(tar).rsplit("/", 1)[-1], exts, start, stop)
        return
    tar = Path(str(tar))
    index = cached_index(index_name(str(tar)))
    try:
        if index is not None:
            yield from _read_by_index(tar, index[start:stop], exts)
        else:
            yield from itertools.islice(_stream_tar(tar, exts), start, stop)
    except (OSError, tarfile.TarError) as e:
        raise HandposeError(f"{tar}: unreadable shard ({e}); re-run handpose pack") from None


@functools.lru_cache(maxsize=256)
def _cached_index(path: str, size: int, mtime_ns: int) -> list[IndexEntry]:
    return read_index(path)


def cached_index(path: str) -> list[IndexEntry] | None:
    """A shard's index, parsed once per process (keyed on size and mtime), or None if absent
    (also what remote.py reads its cached copies' indexes by)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return _cached_index(path, st.st_size, st.st_mtime_ns)


def _read_by_index(tar: Path, entries: list[IndexEntry], exts: Sequence[str]) -> Iterator[Sample]:
    fd = os.open(tar, os.O_RDONLY)
    try:
        for key, members in entries:
            sample: Sample = {"__key__": key, "__url__": str(tar)}
            for ext in exts:
                if ext in members:
                    offset, size = members[ext]
                    data = os.pread(fd, size, offset)
                    if len(data) != size:
                        raise HandposeError(f"{tar}: truncated at sample {key} (re-run handpose pack)")
                    sample[ext] = data
            yield sample
    finally:
        os.close(fd)


def _stream_tar(tar: Path, exts: Sequence[str]) -> Iterator[Sample]:
    """The tar's samples without an index: members grouped by key (the part before the first dot)."""
    wanted = set(exts)
    current: Sample | None = None
    with tarfile.open(tar, mode="r|") as f:
        for info in f:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(tar)}
            if ext in wanted:
                current[ext] = f.extractfile(info).read()  # type: ignore[union-attr]
    if current is not None:
        yield current


@dataclass(frozen=True)
class Annotation:
    """One sample's label, decoded and checked: what loaders, predict and inspect use."""

    uv: np.ndarray  # (21, 2) float32 source pixels
    visibility: np.ndarray  # (21,) uint8, 0 = not labelled
    box: np.ndarray  # (4,) float32 x0, y0, x1, y1 source pixels

    @property
    def labelled(self) -> np.ndarray:
        """(21,) bool: joints with a label (visibility > 0) and finite coordinates."""
        return (self.visibility > 0) & np.isfinite(self.uv).all(axis=1)


READ_LABELS = ("kp.f32", "vis.u8", "box.f32")  # the label members every reader decodes


def decode_annotation(sample: Sample) -> Annotation:
    """The label members of a sample; ValueError (a data error) names what is missing or wrong."""
    missing = [ext for ext in READ_LABELS if ext not in sample]
    if missing:
        raise ValueError(f"missing member {missing[0]}")
    return Annotation(
        decode_keypoints(sample["kp.f32"]), decode_visibility(sample["vis.u8"]), decode_box(sample["box.f32"])
    )


def same_photo(a: Sample, b: Sample) -> bool:
    """Whether sample `b`, read right after `a` from the same shard, is another hand of a's photo.

    Pack keeps a photo's hands consecutive in one shard (one sample per hand, the photo's bytes in
    each) and names the photo in KEY.json's "source"; samples read with their json compare that
    (predict's shard reader groups by it too). Samples read without json, or whose json has no
    "source", compare their image bytes, which are the photo's own, unchanged.
    """
    sa, sb = _photo_source(a), _photo_source(b)
    if sa is not None and sb is not None:
        return sa == sb
    ja, jb = a.get("jpg"), b.get("jpg")
    return ja is not None and ja == jb


def _photo_source(sample: Sample) -> str | None:
    """KEY.json's "source" (parsed once per sample), None when absent or unreadable."""
    if "__source__" not in sample:
        source = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                source = meta.get("source") if isinstance(meta, dict) else None
            except ValueError:
                source = None
        sample["__source__"] = source if isinstance(source, str) else None
    return sample["__source__"]


HASH_BLOCK = 4 << 20  # bytes read per call while hashing: large reads, one reused buffer
PROGRESS_MIN_BYTES = 64 << 20  # hashing less than this is quick: no progress bar


def sha256_file(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's sha256 (hex); `on_bytes(n)` is told of every block read (for a progress bar)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def sha256_blocks(
    path: str | Path, block_bytes: int, on_bytes: Callable[[int], None] | None = None
) -> tuple[str, list[str]]:
    """The file's sha256 and the sha256 of each `block_bytes` of it (the last block shorter), in
    one pass: what a v3 manifest records per shard (`on_bytes` as in `sha256_file`)."""
    whole, blocks = hashlib.sha256(), []
    buf = bytearray(block_bytes)
    view = memoryview(buf)
    with open(path, "rb") as f:  # buffered: readinto fills the whole block unless at the end
        while n := f.readinto(buf):
            whole.update(view[:n])
            blocks.append(hashlib.sha256(view[:n]).hexdigest())
            if on_bytes is not None:
                on_bytes(n)
    return whole.hexdigest(), blocks or [hashlib.sha256(b"").hexdigest()]


def block_span(k: int, block_bytes: int, size: int) -> tuple[int, int]:
    """The bytes [lo, hi) of block `k` of a file of `size` bytes (the last block shorter)."""
    return k * block_bytes, min((k + 1) * block_bytes, size)


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of a shards folder, or of a pack at a URL (`root` a remote.Url;
    `store` reads its shards)."""

    root: Path | Any  # Path, or remote.Url (joined with `/` as a Path is)
    data: dict[str, Any]
    store: Store | None = None

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the training split's pixels, RGB in [0, 1]."""
        return tuple(self.data["stats"]["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.data["stats"]["std"])  # type: ignore[return-value]

    def count(self, split: str) -> int:
        return int(self.data["counts"].get(split, 0))

    def entries(self, split: str | None = None) -> list[dict[str, Any]]:
        """The manifest's shard entries (name, index, split, samples, bytes, sha256, ...) of
        `split` (None: every split), in order."""
        return [s for s in self.data["shards"] if split is None or s["split"] == split]

    def shards(self, split: str) -> list[Path]:
        """Absolute paths (a remote pack: URLs) of a split's shards, in order."""
        return [self.root / s["name"] for s in self.entries(split)]

    def shard_samples(self, split: str) -> list[int]:
        return [int(s["samples"]) for s in self.entries(split)]

    def mean_pose(self, crop: str, size: int, pad: float = 1.0) -> np.ndarray:
        """The train split's mean pose (21, 2) in model-input pixels of a `crop` input of `size`.

        pack stores it in units of the crop ("image": the letterboxed square, 0..1; "box":
        relative to the box centre, in box sides), so it is exact for any size and pad.
        """
        mp = self.data["mean_pose"]
        if crop == "image":
            return np.asarray(mp["image"], np.float64) * size
        return (np.asarray(mp["box"], np.float64) / pad + 0.5) * size


# ---- the manifest's schema: what every consumer relies on ----------------------------------------

_FILE = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a plain file name: no folder, no "..", no leading dot
_SHA256 = schema.text(r"[0-9a-f]{64}", "a sha256 (64 lowercase hex digits)")
_XY = schema.vector(2, schema.number(), "numbers")
_POSE = schema.vector(NUM_JOINTS, _XY, "[x, y] pairs")
_SPREAD = schema.nullable(schema.table({k: schema.number() for k in ("min", "p10", "median", "p90", "max")}))

SHARD_ENTRY = schema.table(
    {
        "name": schema.text(_FILE + r"\.tar", "a plain file name ending in .tar (no folder)"),
        "index": schema.text(_FILE + r"\.idx", "a plain file name ending in .idx (no folder)"),
        "split": schema.one_of(*SPLITS),
        "samples": schema.integer(0),
        "bytes": schema.integer(0),
        "sha256": _SHA256,
    },
    {
        "index_bytes": schema.integer(0),  # recorded by packs since they were added (always in v3)
        "index_sha256": _SHA256,
        "block_bytes": schema.integer(1),  # v3: a sha256 per block_bytes of the tar (the last shorter)
        "block_sha256": schema.items(_SHA256),
    },
)

# Required: what consumers cannot work without. Optional: what they read with a default (inspect's
# tables, predict's refinement boxes); both are type-checked when present.
MANIFEST_SCHEMA = schema.table(
    {
        "format": schema.text(),
        "format_version": schema.integer(1),
        "counts": schema.table({}, values=schema.integer(0)),
        "shards": schema.items(SHARD_ENTRY),
        "stats": schema.table(
            {
                "mean": schema.nullable(schema.vector(3, schema.number(0, 1), "numbers")),
                "std": schema.nullable(schema.vector(3, schema.number(0, 1, positive=True), "numbers")),
            },
            {"pixels": schema.integer(0), "split": schema.text()},
        ),
        "mean_pose": schema.table(
            {
                "image": _POSE,
                "box": _POSE,
                "labelled": schema.vector(NUM_JOINTS, schema.integer(0), "counts"),
            },
            {"split": schema.text()},
        ),
    },
    {
        "tool_version": schema.text(),
        "source": schema.table({}),
        "options": schema.table({}),
        "boxes": schema.table(
            {},
            {
                "side_px": _SPREAD,
                "side_frac": _SPREAD,
                "box_to_keypoints": schema.nullable(schema.number(positive=True)),
                "outside_image": schema.integer(0),
                "hands_per_image": schema.table(
                    {}, {"mean": schema.nullable(schema.number(0)), "max": schema.integer(0)}
                ),
            },
        ),
        "images": schema.table({}, {"with_hands": schema.integer(0), "background": schema.integer(0)}),
        "keypoint_bounds": schema.table(
            {},
            {
                "min_px": schema.nullable(_XY),
                "max_px": schema.nullable(_XY),
                "samples_outside_image": schema.integer(0),
                "labelled_fraction": schema.nullable(schema.number(0, 1)),
            },
        ),
        "skipped": schema.items(schema.table({"file": schema.text(), "reason": schema.text()})),
    },
)


def manifest_problems(data: Any) -> list[str]:
    """Every way `data` (a parsed manifest.json) breaks the schema, one line each naming the key
    path; then, once the types are right, whether its parts agree with each other."""
    problems = MANIFEST_SCHEMA(data, "")
    return problems or consistency_problems(data)


def consistency_problems(data: dict[str, Any]) -> list[str]:
    """Counts that match the shards' samples, each shard listed once beside its own index, and
    pixel statistics wherever there are samples (the types are already checked)."""
    problems = []
    entries = data["shards"]
    names = Counter(e["name"] for e in entries)
    problems += [f"shards: {name!r} is listed {n} times" for name, n in names.items() if n > 1]
    v3 = data["format_version"] >= 3
    for i, e in enumerate(entries):
        problems += block_problems(e, f"shards[{i}]") if v3 else []
        if e["index"] != index_name(e["name"]):
            problems.append(
                f"shards[{i}].index: expected {index_name(e['name'])!r} (the index beside "
                f"{e['name']!r}), got {schema.show(e['index'])}"
            )
    held: Counter[str] = Counter()
    for e in entries:
        held[e["split"]] += e["samples"]
    counts = data["counts"]
    problems += [
        f"counts.{k}: not a split (expected one of {', '.join(SPLITS)})" for k in counts if k not in SPLITS
    ]
    for split in [s for s in SPLITS if s in counts or held[s]]:
        if counts.get(split, 0) != held[split]:
            found = schema.show(counts.get(split))
            problems.append(f"counts.{split}: {found}, but the {split} shards hold {held[split]} samples")
    if sum(held.values()):
        problems += [
            f"stats.{k}: null, but the pack holds samples"
            for k in ("mean", "std")
            if data["stats"][k] is None
        ]
    return problems


def block_problems(entry: dict[str, Any], where: str) -> list[str]:
    """A v3 shard entry's index digests and per-block digests: present, one per block."""
    missing = [k for k in ("index_bytes", "index_sha256", "block_bytes", "block_sha256") if k not in entry]
    if missing:
        return [f"{where}.{missing[0]}: missing (format v3 records it for every shard)"]
    blocks = max(1, math.ceil(entry["bytes"] / entry["block_bytes"]))
    if len(entry["block_sha256"]) != blocks:
        return [
            f"{where}.block_sha256: {len(entry['block_sha256'])} digests, but {entry['bytes']} bytes in "
            f"blocks of {entry['block_bytes']} make {blocks}"
        ]
    return []


def problems_error(problems: Sequence[str], limit: int = 20) -> HandposeError:
    """One error, one line per problem (at most `limit`, then how many more)."""
    lines = list(problems[:limit])
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return HandposeError("\n".join(lines))


def read_manifest(root: str | Path | Location, *, cache: Cache | None = None) -> Manifest:
    """Read OUT/manifest.json, checked against MANIFEST_SCHEMA; a clear error if the folder is not
    a complete handpose pack or the manifest was damaged or edited (one line per problem).
    `root` may be a URL (remote.py fetches the manifest; `cache`: where its shards are kept)."""
    from handpose import remote

    location = remote.parse_location(root)
    if isinstance(location, remote.Url):
        return remote.open_manifest(location, cache=cache)
    root = location
    path = root / MANIFEST
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise HandposeError(f"{root}: {what}; expected a packed shards folder (handpose pack)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HandposeError(
            f"{root}: no {MANIFEST} (not a packed shards folder, or packing did not finish)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandposeError(f"{path}: unreadable manifest: {getattr(e, 'strerror', None) or e}") from None
    return manifest_from(data, str(path), root)


def manifest_from(data: Any, path: str, root: Any) -> Manifest:
    """The Manifest of parsed manifest.json `data` (read from `path`, of the pack at `root`),
    checked: format and version, schema, consistency (one line per problem)."""
    if not isinstance(data, dict):
        raise HandposeError(f"{path}: expected a JSON object, got {schema.show(data)}")
    if data.get("format") == FORMAT_NAME and data.get("format_version") == 1:
        raise HandposeError(
            f"{path}: shard format v1 (no hand boxes or visibility); re-pack the data with this "
            f"version of handpose (handpose pack SRC {root} --overwrite)"
        )
    if data.get("format") != FORMAT_NAME or data.get("format_version") not in READ_VERSIONS:
        raise HandposeError(
            f"{path}: format {data.get('format')!r} v{data.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} v{' or v'.join(map(str, READ_VERSIONS))}"
        )
    problems = manifest_problems(data)
    if problems:
        raise problems_error([f"{path}: {p}" for p in problems])
    return Manifest(root=root, data=data)


def split_shards(
    root: str | Path | Location, split: str, *, cache: Cache | None = None
) -> tuple[Manifest, list[Path]]:
    """Manifest and the shard paths of `split`, each shard's size checked against the manifest
    (one stat per file); a clear error if the split is empty or a shard is missing or truncated.

    Every consumer opens shards through here (the loaders via `datasets.open_sets`), so none
    reads a shard the manifest does not describe. For a URL the shards are URLs: their bytes are
    checked as they are read (`remote.Store`), and what cannot be read safely is refused here."""
    m = read_manifest(root, cache=cache)
    entries = m.entries(split)
    if not entries:
        have = sorted({s["split"] for s in m.data["shards"]})
        raise HandposeError(f"{root}: no shards for split {split!r} (have: {', '.join(have) or 'none'})")
    if m.store is not None:
        m.store.check([e["name"] for e in entries])
        return m, [m.root / e["name"] for e in entries]
    problems = size_problems(m.root, entries)
    if problems:
        raise problems_error(problems)
    return m, [m.root / e["name"] for e in entries]


# ---- integrity: sizes (always) and sha256s (unless the user opts out) ----------------------------

REPACK = "re-run handpose pack"


def file_problem(
    path: Path,
    size: int | None,
    sha256: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    blocks: tuple[int, Sequence[str]] | None = None,
) -> str | None:
    """THE integrity check of a packed file, in its one wording: None when `path` has `size` bytes
    (None: not checked) and, when `sha256` is given, bytes that hash to it (and with `blocks`,
    (block_bytes, block_sha256) of a v3 entry, each block to its digest, in the same pass); else
    what is wrong (missing, unreadable, truncated or changed, damaged). The size comes first: one
    stat, and a file of the wrong size is not worth hashing. `on_bytes` as in `sha256_file`."""
    try:
        actual = path.stat().st_size
        if size is not None and actual != size:
            return size_problem(actual, size)
        if sha256 is None:
            return None
        if blocks is None:
            return None if sha256_file(path, on_bytes) == sha256 else sha256_problem()
        whole, got = sha256_blocks(path, blocks[0], on_bytes)
        if whole != sha256:
            return sha256_problem()
        # the counts agree (`block_problems` checked the manifest): a difference is a wrong digest
        bad = next((k for k, (a, b) in enumerate(zip(got, blocks[1], strict=False)) if a != b), None)
        return None if bad is None else sha256_problem(block_span(bad, blocks[0], actual))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"


def size_problem(actual: int, size: int) -> str:
    """THE wording of a packed file (or a URL's) whose size is not the manifest's."""
    return f"{actual} bytes, the manifest says {size} (truncated or changed since packing)"


def sha256_problem(span: tuple[int, int] | None = None) -> str:
    """THE wording of bytes whose sha256 is not the manifest's: a whole file, or the bytes
    [lo, hi) of it (`span`: a v3 block, which remote reads check on their own)."""
    what = "sha256" if span is None else f"sha256 of bytes {span[0]}..{span[1]}"
    return f"{what} differs from the manifest (damaged or changed since packing)"


def entry_blocks(entry: dict[str, Any]) -> tuple[int, list[str]] | None:
    """A shard entry's (block_bytes, block_sha256) for `file_problem`; None before format v3."""
    return (entry["block_bytes"], entry["block_sha256"]) if "block_sha256" in entry else None


def size_problems(root: Path, entries: Sequence[dict[str, Any]]) -> list[str]:
    """Each shard's size, and its index's where the manifest records it, against the manifest.

    A missing index is not a problem here: the reader then streams the tar (`read_samples`)."""
    files = []
    for e in entries:
        files.append((root / e["name"], e["bytes"]))
        if "index_bytes" in e and (root / e["index"]).exists():
            files.append((root / e["index"], e["index_bytes"]))
    problems = ((path, file_problem(path, size)) for path, size in files)
    return [f"{path}: {p}; {REPACK}" for path, p in problems if p is not None]


def hashed_files(root: Path, entries: Sequence[dict[str, Any]]) -> list[tuple[Path, str, int | None]]:
    """(path, recorded sha256, bytes or None) of every file of `entries` the manifest has a
    digest for: each shard, and its index when recorded and present. None for a remote pack: its
    bytes are checked block by block as they are read (remote.py)."""
    if not isinstance(root, Path):
        return []
    files: list[tuple[Path, str, int | None]] = []
    for e in entries:
        files.append((root / e["name"], e["sha256"], e["bytes"]))
        idx = root / e["index"]
        if "index_sha256" in e and idx.exists():
            files.append((idx, e["index_sha256"], e.get("index_bytes")))
    return files


def hash_problems(
    files: Sequence[tuple[Path, str, int | None]], on_bytes: Callable[[int], None] | None = None
) -> list[str]:
    """One line per file of `hashed_files` that fails `file_problem`."""
    problems = ((path, file_problem(path, size, sha256, on_bytes)) for path, sha256, size in files)
    return [f"{path}: {p}; {REPACK}" for path, p in problems if p is not None]


@contextlib.contextmanager
def hash_progress(total_bytes: int, *, show: bool = True) -> Iterator[Callable[[int], None]]:
    """A callback for `sha256_file`'s `on_bytes` that drives a progress bar on a terminal when
    there is enough to hash to be worth one (`PROGRESS_MIN_BYTES`); a no-op otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not (show and total_bytes >= PROGRESS_MIN_BYTES and console.is_terminal):
        yield lambda n: None
        return
    columns = (TextColumn("checking shards (sha256)"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("sha256", total=total_bytes)
        yield lambda n: bar.advance(task, n)


def verify_shards(manifest: Manifest, entries: Sequence[dict[str, Any]], *, progress: bool = True) -> None:
    """Check the shards of `entries` (and their indexes) against the sha256s the manifest records,
    in this process; raise one line per damaged file. What predict and inspect call before reading
    (train spreads the same work over its ranks: `datasets.verify_sets`)."""
    files = hashed_files(manifest.root, entries)
    with hash_progress(sum(f[2] or 0 for f in files), show=progress) as advance:
        problems = hash_problems(files, advance)
    if problems:
        raise problems_error(problems)
