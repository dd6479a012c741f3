"""outfile.ResultsFile: torn tails repaired (and said), corrupt lines and duplicate ids refused,
settings recorded and checked, one writer at a time; check_writable and write_atomic."""
import json
import os

import pytest

from aad_fast.jobs.outfile import ResultsFile, check_writable, write_atomic

S = {"rule": "AAD(alpha=0.1)", "max_new_tokens": 8}
P = {"file": "/p.jsonl", "sha256": "0" * 64}


def _fill(path, n=3, settings=S):
    with ResultsFile(path, settings, P) as out:
        for i in range(n):
            out.write({"id": i, "completion": f"text {i}"})
    return path.read_bytes()


def test_rows_are_complete_lines_and_a_rerun_sees_them(tmp_path):
    data = _fill(tmp_path / "o.jsonl")
    assert data.count(b"\n") == 3 and data.endswith(b"\n")
    with ResultsFile(tmp_path / "o.jsonl", S, P) as out:
        assert sorted(out.done) == [("int", 0), ("int", 1), ("int", 2)]
        assert out.is_done(1) and not out.is_done("1") and not out.is_done(3)


@pytest.mark.parametrize("cut", [1, 5, -2, -1], ids=["1B", "5B", "mid-row", "no-newline"])
def test_torn_last_row_is_dropped_and_said(tmp_path, capsys, cut):
    path = tmp_path / "o.jsonl"
    data = _fill(path)
    last = data[: -1].rfind(b"\n") + 1
    keep = last + cut if cut > 0 else len(data) + cut
    path.write_bytes(data[:keep])
    with ResultsFile(path, S, P) as out:
        assert sorted(k[1] for k in out.done) == [0, 1]
        out.write({"id": 2, "completion": "text 2"})
    assert "dropped a torn last row" in capsys.readouterr().err
    assert path.read_bytes() == data  # the redone row is not glued onto the torn one


def test_corrupt_middle_line_and_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "o.jsonl"
    data = _fill(path)
    lines = data.splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{not json\n" + lines[2])
    with pytest.raises(ValueError, match="line 2 is not a JSON row"):
        ResultsFile(path, S, P).__enter__()
    path.write_bytes(lines[0] + lines[1] + lines[0])
    with pytest.raises(ValueError, match="id 0 is on lines 1 and 3"):
        ResultsFile(path, S, P).__enter__()


def test_other_settings_or_no_sidecar_are_refused(tmp_path):
    path = tmp_path / "o.jsonl"
    _fill(path)
    with pytest.raises(ValueError, match=r"other settings \(rule: 'AAD\(alpha=0.1\)' in the "
                                         r"file, 'Greedy\(\)' now\)"):
        ResultsFile(path, {**S, "rule": "Greedy()"}, P).__enter__()
    os.remove(str(path) + ".meta.json")
    with pytest.raises(ValueError, match="has 3 row\\(s\\) but no o.jsonl.meta.json"):
        ResultsFile(path, S, P).__enter__()


def test_changed_prompts_are_flagged_for_the_caller(tmp_path):
    path = tmp_path / "o.jsonl"
    _fill(path)
    with ResultsFile(path, S, {**P, "sha256": "1" * 64}) as out:
        assert out.prompts_changed
    with ResultsFile(path, S, {**P, "sha256": "1" * 64}) as out:  # recorded now
        assert not out.prompts_changed


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "o.jsonl"
    with ResultsFile(path, S, P) as out:
        out.write({"id": 0})
        with pytest.raises(ValueError, match="being written by another run"):
            ResultsFile(path, S, P).__enter__()
    with ResultsFile(path, S, P) as out:  # free once the first is closed
        assert out.is_done(0)


def test_check_writable_and_write_atomic(tmp_path):
    with pytest.raises(ValueError, match="--out=.* is a directory"):
        check_writable(tmp_path, "--out")
    with pytest.raises(ValueError, match="does not exist; create it first"):
        check_writable(tmp_path / "nope" / "o.jsonl", "--out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root may write anyway)
            with pytest.raises(ValueError, match="is not writable"):
                check_writable(ro / "o.json", "--json")
    finally:
        ro.chmod(0o700)
    write_atomic(tmp_path / "r.json", json.dumps({"a": 1}))
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- a file not ours, any content
@pytest.mark.parametrize("content", [b"a\nb", b"b", b"notes\n", b'{"id": 0, "prompt": "x"}\n{"id"',
                                     b'\xff\xfe{"id": 0}\n', b"[1, 2]\n{"],
                         ids=["notes", "one-line", "notes-nl", "prompts", "not-utf8", "list"])
def test_a_file_not_ours_is_refused_and_left_byte_for_byte(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="left as it is"):
        ResultsFile(path, S, P).__enter__()
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no sidecar either


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085", "\r", "\x1c", "\x0b\x0c"])
def test_rows_holding_any_line_break_character_resume(tmp_path, sep):
    path = tmp_path / "o.jsonl"
    with ResultsFile(path, S, P) as out:
        out.write({"id": 0, "prompt": f"a{sep}b", "completion": f"c{sep}"})
        out.write({"id": 1, "completion": "d"})
    with ResultsFile(path, S, P) as out:
        assert out.done[("int", 0)]["prompt"] == f"a{sep}b" and out.is_done(1)


@pytest.mark.parametrize("meta", [b"[]", b'"x"', b'{"settings": 3}', b"", b"\xff"])
def test_a_sidecar_of_any_shape_is_refused_not_a_traceback(tmp_path, meta):
    path = tmp_path / "o.jsonl"
    data = _fill(path)
    side = tmp_path / "o.jsonl.meta.json"
    side.write_bytes(meta)
    with pytest.raises(ValueError, match="o.jsonl.meta.json"):
        ResultsFile(path, S, P).__enter__()
    assert path.read_bytes() == data and side.read_bytes() == meta


def test_a_directory_in_place_of_the_sidecar_is_refused(tmp_path):
    path = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.meta.json").mkdir()
    with pytest.raises(ValueError, match="o.jsonl.meta.json"):
        ResultsFile(path, S, P).__enter__()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _full_disk(monkeypatch, after=0):
    """``os.write`` in outfile writes ``after`` bytes, then fails with ENOSPC."""
    import errno

    from aad_fast.jobs import outfile
    real = os.write

    def write(fd, data):
        nonlocal after
        if after <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data)[:after])
        after -= n
        return n
    monkeypatch.setattr(outfile.os, "write", write)


def test_a_full_disk_mid_row_keeps_the_file_whole_and_resumable(tmp_path, monkeypatch):
    path = tmp_path / "o.jsonl"
    data = _fill(path)
    with ResultsFile(path, S, P) as out:
        _full_disk(monkeypatch, after=7)
        with pytest.raises(OSError, match="writing the row of id 3 failed.*rerun to resume"):
            out.write({"id": 3, "completion": "text 3"})
        monkeypatch.undo()
    assert path.read_bytes() == data  # the partial row was taken back
    with ResultsFile(path, S, P) as out:
        out.write({"id": 3, "completion": "text 3"})


def test_write_atomic_on_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import builtins
    import errno
    target = tmp_path / "r.json"
    target.write_text("old")
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):  # a directory in the way: refused, no temporary left
        write_atomic(tmp_path / "d", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "r.json"]
