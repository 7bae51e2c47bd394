"""R serialization / lazy-load reader (hand-built byte strings) and the Jane Austen corpus."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import shutil
import stat
import struct
import zlib
from pathlib import Path

import pytest

from importance.data import corpora
from importance.data.corpora import (
    AUSTEN_EVAL,
    AUSTEN_NOVELS,
    AUSTEN_OBJECTS,
    AUSTEN_TRAIN,
    austen_package_dir,
    austen_text,
    austen_texts,
)
from importance.data.rdata import RList, RSymbol, read_lazyload, read_lazyload_object, read_serialized
from importance.errors import ImpruneError

# --- tiny R serialization writer (XDR), enough to build test streams by hand -----------------------------

UTF8, LATIN1, ASCII = 8, 4, 64
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    head = b"X\n" + i32(version, 0x040201, 0x020300)
    return head + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None, levels: int = UTF8, encoding: str = "utf-8") -> bytes:
    if s is None:
        return i32(9, -1)
    raw = s.encode(encoding)
    return i32(9 | (levels << 12), len(raw)) + raw


def strsxp(*items: str | None, attrs: bytes = b"") -> bytes:
    return i32(16 | (HAS_ATTR if attrs else 0), len(items)) + b"".join(charsxp(s) for s in items) + attrs


def intsxp(*items: int, attrs: bytes = b"") -> bytes:
    return i32(13 | (HAS_ATTR if attrs else 0), len(items), *items) + attrs


def lglsxp(*items: int) -> bytes:
    return i32(10, len(items), *items)


def realsxp(*items: float) -> bytes:
    return i32(14, len(items)) + struct.pack(f">{len(items)}d", *items)


def vecsxp(*items: bytes, attrs: bytes = b"") -> bytes:
    return i32(19 | (HAS_ATTR if attrs else 0), len(items)) + b"".join(items) + attrs


def symsxp(name: str) -> bytes:
    return i32(1) + charsxp(name, ASCII)


def pairlist(*cells: tuple[bytes, bytes]) -> bytes:
    """Cells of (tag bytes, value bytes), each tag a SYMSXP or a REFSXP; ends with NILVALUE_SXP."""
    return b"".join(i32(2 | HAS_TAG) + tag + value for tag, value in cells) + i32(254)


def names_attr(*names: str) -> bytes:
    return pairlist((symsxp("names"), strsxp(*names)))


# --- serializer: exact small cases ------------------------------------------------------------------------


def test_character_vector_with_na_and_encodings() -> None:
    data = header() + i32(16, 4) + charsxp("a") + charsxp(None) + charsxp("£20,000") + \
        charsxp("café", LATIN1, "latin-1")
    assert read_serialized(data) == ["a", None, "£20,000", "café"]


def test_integer_logical_real_vectors() -> None:
    assert read_serialized(header() + intsxp(1, -7, 2**31 - 1)) == [1, -7, 2**31 - 1]
    assert read_serialized(header(2) + intsxp(5, -(2**31))) == [5, None]  # NA_integer_ -> None
    assert read_serialized(header() + lglsxp(1, 0, -(2**31))) == [1, 0, None]
    reals = read_serialized(header() + realsxp(1.5, -2.0, math.inf))
    assert reals == [1.5, -2.0, math.inf]
    assert read_serialized(header() + i32(254)) is None  # NULL


def test_long_length_vector() -> None:
    assert read_serialized(header() + i32(13, -1, 0, 3, 7, 8, 9)) == [7, 8, 9]


def test_named_list_has_names_and_attributes() -> None:
    data = header() + vecsxp(intsxp(1, 2), strsxp("x"), attrs=names_attr("nums", "chars"))
    value = read_serialized(data)
    assert isinstance(value, RList)
    assert value == [[1, 2], ["x"]]
    assert value.names == ["nums", "chars"]
    assert value.to_dict() == {"nums": [1, 2], "chars": ["x"]}
    # an attribute on an atomic vector is kept too
    attrs = pairlist((symsxp("names"), strsxp("n")), (symsxp("class"), strsxp("k")))
    data = header() + intsxp(3, attrs=attrs)
    value = read_serialized(data)
    assert value == [3] and value.attributes == {"names": ["n"], "class": ["k"]}


def test_refsxp_points_back_to_a_symbol() -> None:
    # pairlist(a = 1L, b = 2L, a = 3L): the third tag is a reference to the first symbol (ref #1, packed)
    # and a fourth uses the unpacked form (index 0 in the flags, then the index as its own int)
    cells = [(symsxp("a"), intsxp(1)), (symsxp("b"), intsxp(2)), (i32(255 | (1 << 8)), intsxp(3)),
             (i32(255, 2), intsxp(4))]
    value = read_serialized(header() + pairlist(*cells))
    assert value == [[1], [2], [3], [4]]
    assert value.names == ["a", "b", "a", "b"]
    assert all(isinstance(n, RSymbol) for n in value.names)
    with pytest.raises(ImpruneError, match="reference index 3"):
        read_serialized(header() + pairlist((symsxp("a"), intsxp(1)), (i32(255 | (3 << 8)), intsxp(2))))


def test_symbol_and_environment_placeholders() -> None:
    assert read_serialized(header() + symsxp("mean")) == "mean"
    assert read_serialized(header() + vecsxp(i32(242), i32(253), i32(241))) == ["<emptyenv>", "<globalenv>",
                                                                               "<baseenv>"]


def test_environment_frame() -> None:
    # ENVSXP: locked flag, enclosure, frame pairlist, hash table (NULL), attributes (NULL)
    data = header() + i32(4, 0) + i32(253) + pairlist((symsxp("x"), intsxp(42))) + i32(254) + i32(254)
    env = read_serialized(data)
    assert env.frame == {"x": [42]} and env.enclos == "<globalenv>"


def test_ascii_format() -> None:
    text = "A\n3\n262657\n197888\n5\nUTF-8\n16\n3\n16393\n5\nh\\351llo\n9\n-1\n262153\n3\na\\040b\n"
    assert read_serialized(text.encode()) == ["h\xe9llo", None, "a b"]
    assert read_serialized(b"A\n2\n1\n1\n13\n3\n1\nNA\n-4\n") == [1, None, -4]


def test_errors_name_the_problem() -> None:
    with pytest.raises(ImpruneError, match="CLOSXP"):
        read_serialized(header() + i32(3))
    with pytest.raises(ImpruneError, match="version 4"):
        read_serialized(b"X\n" + i32(4, 0, 0))
    with pytest.raises(ImpruneError, match="native binary"):
        read_serialized(b"B\n" + i32(3))
    with pytest.raises(ImpruneError, match="truncated"):
        read_serialized(header() + i32(13, 5, 1))


# --- lazy-load databases -----------------------------------------------------------------------------------


def _record(raw: bytes, compressed: int, kind: bytes = b"Z") -> bytes:
    size = struct.pack(">I", len(raw))
    if compressed == 1:
        return size + zlib.compress(raw)
    codec = {b"Z": zlib.compress, b"2": bz2.compress, b"X": lzma.compress, b"0": bytes}[kind]
    return size + kind + codec(raw)


def _write_db(tmp_path: Path, objects: dict[str, bytes], compressed: int, kinds: list[bytes],
              gzip_index: bool) -> tuple[Path, Path]:
    blobs = [_record(raw, compressed, kind) for raw, kind in zip(objects.values(), kinds)]
    offsets = [sum(len(b) for b in blobs[:i]) for i in range(len(blobs))]
    variables = vecsxp(*(intsxp(o, len(b)) for o, b in zip(offsets, blobs)), attrs=names_attr(*objects))
    index = header() + vecsxp(variables, vecsxp(attrs=names_attr()), intsxp(compressed),
                              attrs=names_attr("variables", "references", "compressed"))
    rdx, rdb = tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb"
    rdx.write_bytes(gzip.compress(index) if gzip_index else _record(index, 1))
    rdb.write_bytes(b"".join(blobs))
    return rdx, rdb


def test_lazyload_zlib_pair(tmp_path: Path) -> None:
    objects = {"first": header() + strsxp("It is a truth", None, "universally acknowledged"),
               "second": header() + intsxp(1, 2, 3)}
    rdx, rdb = _write_db(tmp_path, objects, 1, [b"Z", b"Z"], gzip_index=False)
    assert read_lazyload(rdx, rdb) == {"first": ["It is a truth", None, "universally acknowledged"],
                                       "second": [1, 2, 3]}
    assert read_lazyload_object(rdx, rdb, "second") == [1, 2, 3]
    with pytest.raises(ImpruneError, match="first, second"):
        read_lazyload_object(rdx, rdb, "third")


def test_lazyload_gzip_index_and_typed_records(tmp_path: Path) -> None:
    """R writes the .rdx like an .rds (gzip); compression 2/3 adds a type byte per record."""
    objects = {"x": header() + strsxp("xz"), "b": header() + strsxp("bz"), "z": header() + strsxp("zl"),
               "s": header() + strsxp("stored")}
    rdx, rdb = _write_db(tmp_path, objects, 3, [b"X", b"2", b"Z", b"0"], gzip_index=True)
    assert read_lazyload(rdx, rdb) == {"x": ["xz"], "b": ["bz"], "z": ["zl"], "s": ["stored"]}


# --- corpus, offline: a fake janeaustenr package / fake tools ----------------------------------------------


def _fake_package(root: Path, novels: dict[str, list[str | None]]) -> None:
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    _write_db(data, {n: header() + strsxp(*lines) for n, lines in novels.items()}, 1, [b"Z"] * len(novels),
              gzip_index=True)


def _fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_names_and_split() -> None:
    assert AUSTEN_OBJECTS == ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                              "northangerabbey", "persuasion")
    assert list(AUSTEN_NOVELS)[:6] == list(AUSTEN_OBJECTS)
    assert AUSTEN_NOVELS["pride"] == "prideprejudice" and AUSTEN_NOVELS["northanger"] == "northangerabbey"
    assert set(AUSTEN_NOVELS.values()) == set(AUSTEN_OBJECTS)
    assert AUSTEN_EVAL == "persuasion" and AUSTEN_EVAL not in AUSTEN_TRAIN and len(AUSTEN_TRAIN) == 5


def test_corpus_from_a_given_deb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IMPRUNE_AUSTEN_DEB + a stand-in dpkg-deb copying a fake package: texts, aliases, NA lines, cache."""
    tree = tmp_path / "tree"
    _fake_package(tree, {n: [n.upper(), None, f"text of {n}"] for n in AUSTEN_OBJECTS})
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "dpkg-deb", f'{shutil.which("cp")} -r "{tree}/." "$3"\n')  # PATH is only bin_dir
    deb = tmp_path / "r-cran-janeaustenr_0_all.deb"
    deb.write_bytes(b"fake")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMPRUNE_AUSTEN_DEB", str(deb))

    assert austen_text("pride") == "PRIDEPREJUDICE\n\ntext of prideprejudice"
    assert austen_package_dir() == tmp_path / "cache/austen/deb/usr/lib/R/site-library/janeaustenr"
    texts = austen_texts(["persuasion", "Northanger Abbey"])
    assert texts == {"persuasion": "PERSUASION\n\ntext of persuasion",
                     "Northanger Abbey": "NORTHANGERABBEY\n\ntext of northangerabbey"}
    # cached: neither the package nor the tool is needed any more
    (bin_dir / "dpkg-deb").unlink()
    shutil.rmtree(tmp_path / "cache/austen/deb")
    assert austen_text("emma") == "EMMA\n\ntext of emma"
    with pytest.raises(ImpruneError, match="unknown Austen novel 'ulysses'; use one of sensesensibility"):
        austen_text("ulysses")


def test_missing_tools_and_empty_apt_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMPRUNE_AUSTEN_DEB", raising=False)
    with pytest.raises(ImpruneError, match="dpkg-deb not found"):
        austen_package_dir()
    _fake_tool(bin_dir, "dpkg-deb", "exit 1\n")
    with pytest.raises(ImpruneError, match="apt-get not found.*IMPRUNE_AUSTEN_DEB"):
        austen_package_dir()
    _fake_tool(bin_dir, "apt-get", 'if [ "$1" = update ]; then echo "E: Could not open lock file" >&2; '
               'exit 100; fi\necho "E: Unable to locate package r-cran-janeaustenr" >&2\nexit 100\n')
    with pytest.raises(ImpruneError, match=r"sudo apt-get update.*IMPRUNE_AUSTEN_DEB") as err:
        austen_package_dir()
    assert "Could not open lock file" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("IMPRUNE_AUSTEN_DEB", str(tmp_path / "nope.deb"))
    with pytest.raises(ImpruneError, match="is not a file"):
        austen_package_dir()
    assert not (tmp_path / "cache/austen/deb").exists()  # nothing half-made is left behind


# --- the real package --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_austen_corpus() -> None:
    texts = austen_texts()
    assert list(texts) == list(AUSTEN_OBJECTS)
    assert all(text.strip() for text in texts.values())
    persuasion = texts["persuasion"]
    assert persuasion.startswith("Persuasion\n\n\nby\n\nJane Austen\n\n(1818)")
    assert 7000 < persuasion.count("\n") + 1 < 10000  # 8328 lines in r-cran-janeaustenr 1.0.0
    assert "Sir Walter Elliot, of Kellynch Hall" in persuasion
    assert "It is a truth universally acknowledged" in texts["prideprejudice"]
    assert texts["emma"].startswith("EMMA") and "Emma Woodhouse, handsome, clever, and rich" in texts["emma"]
    assert "£20,000" in texts["mansfieldpark"]  # a UTF-8 flagged string decodes
    # six distinct novels, each of a novel's size
    assert len(set(texts.values())) == 6
    assert all(400_000 < len(text) < 1_000_000 for text in texts.values())
    assert austen_text("pride") == texts["prideprejudice"]
    data = austen_package_dir() / "data"
    assert read_lazyload_object(data / "Rdata.rdx", data / "Rdata.rdb", "persuasion")[15].startswith(
        "Sir Walter Elliot")
    assert corpora.AUSTEN_EVAL in texts
