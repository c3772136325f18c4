"""The shard format's own reader and writer agree: read_index offsets point at the written bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handpose.errors import HandposeError
from handpose.shards import ShardWriter, encode_keypoints, read_index, sample_key


def test_read_index_locates_every_member(tmp_path: Path) -> None:
    written = {}
    w = ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx")
    for sid in (3, 10, 7):
        members = {"jpg": bytes([sid]) * (100 + sid), "kp.f32": encode_keypoints(np.full((21, 2), sid))}
        w.write(sample_key(sid), members)
        written[sample_key(sid)] = members
    w.close()
    entries = read_index(tmp_path / "s.idx")
    assert [key for key, _ in entries] == [sample_key(s) for s in (3, 10, 7)]  # tar order
    data = (tmp_path / "s.tar").read_bytes()
    for key, members in entries:
        assert {ext: data[o : o + n] for ext, (o, n) in members.items()} == written[key]


def test_read_index_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_index(tmp_path / "none.idx")
    bad = tmp_path / "bad.idx"
    bad.write_text("v1.2 2\njpg 512 3 a.jpg\n")
    with pytest.raises(HandposeError, match="bad index header"):
        read_index(bad)
    bad.write_text("v1.2 1\njpg 512 a.jpg\n")
    with pytest.raises(HandposeError, match="bad.idx:2"):
        read_index(bad)
