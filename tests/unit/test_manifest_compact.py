"""The labelling driver's compact manifest steps (issue 13 item 7) give what the Python-object versions gave:
``_plan`` (ids packed to uint64, sorted and searched; a 64-bit digest for ids of another form) against the old
set-of-str filter, ``done_packed`` against ``done_ids``, ``pack_ids`` against ``int(id, 16)``, the one-pass
``_looks_like_video`` against the old list version, and the slotted listing types."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from cluster import catalog, storage
from cluster import label as LB
from cluster import labels as L
from cluster.label import plan as label_plan
from cluster.label import stages as label_stages
from kd import schema as S


def _old_looks_like_video(keys):
    parts = [k.split("/") for k in keys]
    return bool(parts) and all(len(p) == 3 and p[1] in ("images", "masks") for p in parts) and any(
        p[1] == "images" for p in parts)


def _old_plan(cfg, manifest, fs, root):
    listed_rejects = [it for it, _, _ in manifest.rejected]
    label_plan._check_ids(cfg, manifest.items + listed_rejects)
    L.remove_stale_temporaries(fs, root)
    done = L.done_ids(fs, root)
    return ([i for i in manifest.items if i.id not in done],
            [r for r in manifest.rejected if r[0].id not in done])


def _label_table(keys, id_of=S.stable_id):
    n = len(keys)
    return pa.table({
        S.ID: [id_of(k) for k in keys], S.KEY: keys, S.SEQUENCE: [""] * n, S.FRAME: [-1] * n,
        S.ORIG_H: [4] * n, S.ORIG_W: [4] * n, S.TEACHER: ["t"] * n, S.WEIGHTS_HASH: ["h"] * n, S.TTA: ["none"] * n,
        S.LABEL_H: [4] * n, S.LABEL_W: [4] * n, S.LABEL_PNG: [b"png"] * n, S.CONF_MEAN: [0.5] * n,
        S.CONF_FRAC: [0.5] * n, S.FG_FRAC: [0.5] * n, S.DISAGREEMENT: [float("nan")] * n}, schema=L.LABEL_SCHEMA)


def _reject_table(keys, id_of=S.stable_id):
    n = len(keys)
    batch = {S.ID: np.array([id_of(k) for k in keys], dtype=object), S.KEY: np.array(keys, dtype=object),
             S.SEQUENCE: np.array([""] * n, dtype=object), S.FRAME: np.full(n, -1, np.int32),
             S.REASON: np.array(["corrupt"] * n, dtype=object), S.DETAIL: np.array(["bad"] * n, dtype=object)}
    return label_stages._reject_table(batch, np.arange(n))


@pytest.fixture
def output(tmp_path):
    """An output holding labels of a..d (d twice: a retried task), rejects of e and of the listed reject r1,
    ids of keys no longer listed, a foreign unreadable shard and a stale temporary."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    L.write_shard(fs, root, S.LABELS_DIR, _label_table(["a.jpg", "b.jpg", "gone.jpg"]))
    L.write_shard(fs, root, S.LABELS_DIR, _label_table(["c.jpg", "d.jpg"]))
    L.write_shard(fs, root, S.LABELS_DIR, _label_table(["d.jpg"]))
    L.write_shard(fs, root, S.REJECTS_DIR, _reject_table(["e.jpg", "r1.jpg", "gone2.jpg"]))
    (tmp_path / "out" / S.LABELS_DIR / "part-foreign.parquet").write_bytes(b"garbage")
    stale = tmp_path / "out" / S.LABELS_DIR / ".part-x.parquet.tmp-1234"
    stale.write_bytes(b"PAR1 half")
    return fs, root, stale


def _manifest(keys, reject_keys, item=catalog.Item):
    items = [item(k, f"in/{k}") for k in keys]
    rejected = [(item(k, f"in/{k}"), "broken_link", "symlink to 'x'") for k in reject_keys]
    return LB.Manifest(items, rejected, "images")


def test_plan_filters_as_the_set_of_str_did(output, monkeypatch):
    fs, root, stale = output
    monkeypatch.setattr(label_plan, "_ID_CHUNK", 3)   # several id chunks on a small listing
    cfg = LB.LabelConfig(input="in", output=root, teachers=("t.ts",))
    keys = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "sub/../g.jpg", "h h.jpg", "é.jpg"]
    manifest = _manifest(keys, ["r1.jpg", "r2.jpg"])
    todo, rejected_now = label_plan._plan(cfg, manifest, fs, root)
    assert not stale.exists()   # the temporary was removed, as before
    assert [i.key for i in todo] == ["f.jpg", "sub/../g.jpg", "h h.jpg", "é.jpg"]
    assert [r[0].key for r in rejected_now] == ["r2.jpg"]
    assert rejected_now[0] is manifest.rejected[1] and todo[0] is manifest.items[5]   # the same objects
    assert (todo, rejected_now) == _old_plan(cfg, manifest, fs, root)
    # nothing done yet: everything; everything done: nothing
    empty = str(fs.normalize_path(root) + "-none")
    assert label_plan._plan(cfg, manifest, fs, empty) == (manifest.items, manifest.rejected)
    done_all = _manifest(["a.jpg", "c.jpg"], ["r1.jpg"])
    assert label_plan._plan(cfg, done_all, fs, root) == ([], []) == _old_plan(cfg, done_all, fs, root)
    assert label_plan._plan(cfg, _manifest([], []), fs, root) == ([], [])


class Named(catalog.Item):
    """An item whose id is not of the stable_id form: the Arrow path."""

    @property
    def id(self) -> str:
        return f"n-{self.key}"


def test_plan_with_ids_of_another_form_filters_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(label_plan, "_ID_CHUNK", 2)
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    L.write_shard(fs, root, S.LABELS_DIR, _label_table(["a.jpg", "c.jpg"], lambda k: f"n-{k}"))
    L.write_shard(fs, root, S.LABELS_DIR, _label_table(["b.jpg"]))      # a stable id: matches no Named item
    L.write_shard(fs, root, S.REJECTS_DIR, _reject_table(["r1.jpg"], lambda k: f"n-{k}"))
    cfg = LB.LabelConfig(input="in", output=root, teachers=("t.ts",))
    manifest = _manifest(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"], ["r1.jpg", "r2.jpg"], Named)
    todo, rejected_now = label_plan._plan(cfg, manifest, fs, root)
    assert [i.key for i in todo] == ["b.jpg", "d.jpg", "e.jpg"] and [r[0].key for r in rejected_now] == ["r2.jpg"]
    assert (todo, rejected_now) == _old_plan(cfg, manifest, fs, root)
    # stable ids first, then one of another form (a later chunk): the packed chunks go back to strings
    mixed = LB.Manifest([catalog.Item("a.jpg", "in/a.jpg"), catalog.Item("b.jpg", "in/b.jpg"),
                         catalog.Item("x.jpg", "in/x.jpg"), Named("c.jpg", "in/c.jpg")], [], "images")
    assert [i.key for i in label_plan._plan(cfg, mixed, fs, root)[0]] == ["a.jpg", "x.jpg"]
    assert label_plan._plan(cfg, mixed, fs, root) == _old_plan(cfg, mixed, fs, root)


def test_plan_still_names_an_id_collision_and_allows_a_repeated_key(output):
    fs, root, _ = output

    class SameId(catalog.Item):
        @property
        def id(self) -> str:
            return "0123456789abcdef"

    cfg = LB.LabelConfig(input="in", output=root, teachers=("t.ts",))
    m = LB.Manifest([catalog.Item("a.jpg", "in/a.jpg"), SameId("x/../b.jpg", "in/x/../b.jpg")],
                    [(SameId("b.jpg", "in/b.jpg"), "broken_link", "")], "images")
    with pytest.raises(ValueError, match=r"'x/\.\./b\.jpg' and 'b\.jpg' hash to the same id 0123456789abcdef"):
        label_plan._plan(cfg, m, fs, root)
    same = LB.Manifest([catalog.Item("z.jpg", "in/z.jpg"), catalog.Item("z.jpg", "in/z.jpg")], [], "images")
    assert label_plan._plan(cfg, same, fs, root) == (same.items, [])


def test_done_packed_holds_the_done_ids_sorted(output):
    fs, root, _ = output
    arr = L.done_packed(fs, root)
    done = L.done_ids(fs, root)
    assert done == {S.stable_id(k) for k in ["a.jpg", "b.jpg", "gone.jpg", "c.jpg", "d.jpg", "e.jpg", "r1.jpg",
                                             "gone2.jpg"]}
    assert arr.dtype == np.uint64 and arr.tolist() == sorted([int(i, 16) for i in done] + [int(S.stable_id("d.jpg"), 16)])
    assert len(L.done_packed(fs, root + "-none")) == 0


def test_pack_any_packs_stable_ids_exactly_and_digests_the_rest():
    items = [S.stable_id(f"k{i}.jpg") for i in range(5)]
    assert L.pack_any(items).tolist() == [int(i, 16) for i in items] == L.pack_any(iter(items)).tolist()
    assert len(L.pack_any([])) == 0
    mixed = L.pack_any(items + ["n-z.jpg", "N-Z.JPG", "n-z.jpg"])
    assert mixed.dtype == np.uint64 and mixed[:5].tolist() == [int(i, 16) for i in items]
    assert mixed[5] == mixed[7] != mixed[6] and len(set(mixed.tolist())) == 7


def test_pack_ids_is_int_base_16_of_stable_ids():
    ids = [S.stable_id(str(i)) for i in range(300)] + ["0000000000000000", "ffffffffffffffff"]
    want = [int(v, 16) for v in ids]
    for typ in (pa.string(), pa.large_string()):
        arr = pa.array(ids, typ)
        assert L.pack_ids(arr).tolist() == want
        assert L.pack_ids(arr.slice(7, 50)).tolist() == want[7:57]
        assert L.pack_ids(pa.chunked_array([arr.slice(0, 3), arr.slice(3)])).tolist() == want
    for other in (["0123456789ABCDEF"], ["0123456789abcde"], ["0123456789abcdef0"], ["0123456789abcdeg"],
                  ["0123456789abcdef", None], [" 123456789abcdef"]):
        assert L.pack_ids(pa.array(other, pa.string())) is None, other
    mixed = pa.array(["ffffffffffffffff", None, "x", "0000000000000001", "0123456789ABCDEF"])
    assert L.pack_ids(mixed, drop_other=True).tolist() == [2**64 - 1, 1]
    assert L.pack_ids(pa.chunked_array([], pa.string())).tolist() == []


def test_sorted_isin():
    vals = np.array([1, 5, 9, 2**64 - 1], np.uint64)
    x = np.array([0, 1, 4, 5, 9, 10, 2**64 - 1, 2**64 - 2], np.uint64)
    assert label_plan._sorted_isin(vals, x, chunk=3).tolist() == [False, True, False, True, True, False, True, False]
    assert label_plan._sorted_isin(vals[:0], x).tolist() == [False] * 8


def test_looks_like_video_as_before():
    cases = [[], ["s/images/0.jpg"], ["s/masks/0.png"], ["s/images/0.jpg", "s/masks/0.png"],
             ["s/images/0.jpg", "s/0.jpg"], ["s/images/0.jpg", "s/images/x/0.jpg"], ["a.jpg"],
             ["s/images/0.jpg", "t/other/0.jpg"], ["s/masks/0.png", "t/images/1.jpg"], ["images/0.jpg"]]
    for keys in cases:
        assert label_plan._looks_like_video(keys) == _old_looks_like_video(keys), keys
        assert label_plan._looks_like_video(iter(keys)) == _old_looks_like_video(keys), keys


def test_slotted_listing_types_compare_hash_and_pickle_as_before():
    it = catalog.Item("a/b.jpg", "root/a/b.jpg", sequence="s", frame=3)
    assert pickle.loads(pickle.dumps(it)) == it and hash(pickle.loads(pickle.dumps(it))) == hash(it)
    assert it.id == S.stable_id("a/b.jpg") and not hasattr(it, "__dict__")
    with pytest.raises(AttributeError):
        it.key = "c.jpg"
    e = storage.Listed("root/x.jpg")
    assert (e.kind, e.detail) == (storage.FILE, "") and pickle.loads(pickle.dumps(e)) == e


def test_walk_is_still_sorted_by_path(tmp_path):
    for rel in ["b/2.jpg", "a.jpg", "b/1.jpg", "c d.jpg", "B.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    paths = [e.path for e in storage.walk(pafs.LocalFileSystem(), str(tmp_path))]
    assert paths == sorted(paths) and len(paths) == 5


def test_iter_walk_streams_local_paths_in_sorted_order(tmp_path):
    """A sub-folder sorts as its name + "/": ``a-b.jpg`` < ``a/`` < ``a0.jpg``, so depth first is path order."""
    import os
    for rel in ["a/b/2.jpg", "a-b.jpg", "a/1.jpg", "a0.jpg", "a/b-c/x.jpg", "a/b.jpg", "Z/é.jpg", "c d/x.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "a" / "broken.jpg")
    os.mkfifo(tmp_path / "a" / "fifo.jpg")
    it = storage.iter_walk(pafs.LocalFileSystem(), str(tmp_path))
    assert not isinstance(it, list)
    streamed = list(it)
    paths = [e.path for e in streamed]
    assert paths == sorted(paths) and len(paths) == 10
    assert streamed == storage.walk(pafs.LocalFileSystem(), str(tmp_path))
    kinds = {os.path.relpath(e.path, tmp_path): e.kind for e in streamed if e.kind != storage.FILE}
    assert kinds == {"a/broken.jpg": storage.BROKEN_LINK, "a/fifo.jpg": storage.SPECIAL}
    one = tmp_path / "a0.jpg"
    assert [e.path for e in storage.iter_walk(pafs.LocalFileSystem(), str(one))] == [str(one)]
    with pytest.raises(FileNotFoundError):
        next(storage.iter_walk(pafs.LocalFileSystem(), str(tmp_path / "nope")))
