"""Read R data without R: R's serialization format and R lazy-load databases (``.rdx`` + ``.rdb``).

imprune uses it to take the Jane Austen corpus out of Debian's ``r-cran-janeaustenr`` package, whose
``data/Rdata.rdx`` / ``Rdata.rdb`` pair holds one character vector per novel.

Serialization (``serialize()`` / ``saveRDS()`` streams):
  header ``X\\n`` (XDR: big-endian ints and doubles) or ``A\\n`` (ascii: one token per value, strings with C
  escapes), then int version (2 or 3), writer R version, minimum reader version; version 3 adds an int
  length and a native-encoding name. Then one item, recursively: a 32-bit flags int with
  ``type = flags & 0xFF``, is-object bit 8, has-attributes bit 9, has-tag bit 10, ``levels = flags >> 12``.
  Vectors: int length (-1 means a long length in two more ints), the elements, then the attributes
  pairlist if flagged. Pairlists: [attributes] [tag] car cdr. CHARSXP: length (-1 = NA) and bytes, encoding
  in ``levels`` (UTF8 8, LATIN1 4, BYTES 2, ASCII 64). Symbols, environments and the namespace/package/
  persistent placeholders join a reference table; REFSXP (255) points back into it (1-based index in
  ``flags >> 8``, or in the next int when that is 0).
Lazy-load database: ``NAME.rdx`` is a serialized list(variables, references, compressed), stored
  gzip/bzip2/xz-compressed like an ``.rds`` file (or as one lazy-load record); ``variables`` maps each
  object name to c(offset, length) in ``NAME.rdb``. Each record there is a 4-byte big-endian uncompressed
  length and then, per ``compressed``: 0 = raw stream (no header), 1 = zlib, 2/3 = one type byte
  (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` stored) and the payload.

Results are plain Python: character -> list[str | None], integer/logical -> list[int | None] (NA -> None),
double -> list[float] (NA -> nan), complex -> list[complex], raw -> bytes, list -> list, NULL -> None, a
symbol -> its name (``RSymbol``, a ``str``). A pairlist, and any vector with attributes, comes back as
``RList`` (a ``list`` subclass with ``.attributes`` and ``.names``, and ``.to_dict()`` for named lists;
pairlist tags are its names); an environment as ``REnvironment``. Unknown types raise ``ImpruneError``.
Nothing is evaluated: no pickle, no eval.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from importance.errors import ImpruneError

_NAMES = {1: "SYMSXP", 2: "LISTSXP", 3: "CLOSXP", 4: "ENVSXP", 5: "PROMSXP", 6: "LANGSXP", 7: "SPECIALSXP",
          8: "BUILTINSXP", 17: "DOTSXP", 20: "EXPRSXP", 21: "BCODESXP", 22: "EXTPTRSXP", 23: "WEAKREFSXP",
          25: "S4SXP", 238: "ALTREP_SXP", 239: "ATTRLISTSXP", 240: "ATTRLANGSXP", 244: "BCREPDEF",
          245: "GENERICREFSXP", 246: "CLASSREFSXP"}
_PLACEHOLDERS = {254: None, 253: "<globalenv>", 252: "<unbound>", 251: "<missing>", 250: "<basenamespace>",
                 242: "<emptyenv>", 241: "<baseenv>"}
_NA_INT = -(2**31)
_type_name = lambda kind: _NAMES.get(kind, f"#{kind}")
_TOKEN = re.compile(rb"\S+")
_ESCAPE = re.compile(rb"\\([0-7]{1,3}|.)", re.DOTALL)
_C_ESCAPES = {b"n": b"\n", b"t": b"\t", b"v": b"\v", b"b": b"\b", b"r": b"\r", b"f": b"\f", b"a": b"\a"}
_SPECIAL = {b"NA": math.nan, b"NaN": math.nan, b"Inf": math.inf, b"-Inf": -math.inf}


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    if code[:1].isdigit():
        return bytes([int(code, 8) & 0xFF])
    return _C_ESCAPES.get(code, code)  # \\ \? \' \" stand for themselves


def _ascii_double(tok: bytes) -> float:
    if tok in _SPECIAL:
        return _SPECIAL[tok]
    try:
        return float(tok)
    except ValueError:  # the "asciihex" variant writes C99 hex floats
        return float.fromhex(tok.decode("ascii"))


class RSymbol(str):
    """An R symbol (``as.name``), decoded to its name."""


class RList(list):
    """A vector or pairlist that carried attributes: the values, plus ``.attributes`` (name -> value)."""

    def __init__(self, values: Iterable[object] = (), attributes: dict[str, object] | None = None) -> None:
        super().__init__(values)
        self.attributes: dict[str, object] = dict(attributes or {})

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute (or pairlist tags), or None."""
        names = self.attributes.get("names")
        return list(names) if names is not None else None

    def to_dict(self) -> dict[str | None, object]:
        """Name -> value (later duplicates win); raises if there are no names."""
        if self.names is None:
            raise ImpruneError("this R list has no names; index it by position instead")
        return dict(zip(self.names, self))


@dataclass
class REnvironment:
    """An R environment: its variables (``frame``, name -> value), enclosure and attributes."""

    frame: dict[str, object] = field(default_factory=dict)
    enclos: object = None
    attributes: dict[str, object] = field(default_factory=dict)
    locked: bool = False


@dataclass
class RPersistent:
    """A NAMESPACESXP / PACKAGESXP / PERSISTSXP placeholder: ``kind`` and the strings R wrote for it."""

    kind: str
    spec: list[str | None]


class _Reader:
    def __init__(self, data: bytes) -> None:
        if data[:2] not in (b"X\n", b"A\n"):
            kind = "native binary ('B')" if data[:2] == b"B\n" else f"unknown header {data[:2]!r}"
            raise ImpruneError(f"cannot read this R serialized stream ({kind}); only XDR 'X' and ascii 'A'")
        self.data, self.pos, self.ascii = data, 2, data[:1] == b"A"
        self.refs: list[object] = []
        self.encoding = "utf-8"

    def _token(self) -> bytes:
        match = _TOKEN.search(self.data, self.pos)
        if match is None:
            raise ImpruneError("truncated R serialized stream")
        self.pos = match.end()
        return match.group()

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ImpruneError("truncated R serialized stream")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def int(self) -> int:
        if not self.ascii:
            return struct.unpack(">i", self._take(4))[0]
        tok = self._token()
        return _NA_INT if tok == b"NA" else int(tok)

    def ints(self, n: int) -> list[int | None]:
        vals = [self.int() for _ in range(n)] if self.ascii else struct.unpack(f">{n}i", self._take(4 * n))
        return [None if v == _NA_INT else v for v in vals]

    def doubles(self, n: int) -> list[float]:
        if not self.ascii:
            return list(struct.unpack(f">{n}d", self._take(8 * n)))
        return [_ascii_double(self._token()) for _ in range(n)]

    def string(self, n: int) -> bytes:
        if not self.ascii:
            return self._take(n)
        # ascii strings are C-escaped (blanks and non-ASCII bytes as \\ooo), so one token each
        return _ESCAPE.sub(_unescape, self._token()) if n else b""

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()  # -1: a long length in two ints

    def header(self) -> None:
        version, _writer, _min_reader = self.int(), self.int(), self.int()
        if version == 3:
            self.encoding = self.string(self.int()).decode("ascii", "replace")
        elif version != 2:
            raise ImpruneError(f"unsupported R serialization format version {version}; expected 2 or 3")
        if self.encoding.upper() in ("UTF8", "UTF-8"):
            self.encoding = "utf-8"

    def attributes(self, flags: int) -> dict[str, object]:
        return _as_dict(self.item()) if flags & (1 << 9) else {}

    def _element_flags(self) -> int:
        flags = self.int()
        if flags & 0xFF != 9:
            raise ImpruneError(f"R character vector holds a {_type_name(flags & 0xFF)}, not a CHARSXP")
        return flags

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw, levels = self.string(n), flags >> 12
        if levels & 4 or levels & 2:  # latin1, or "bytes": keep every byte as one code point
            return raw.decode("latin-1")
        try:
            return raw.decode("utf-8" if levels & (8 | 64) else self.encoding)
        except (LookupError, UnicodeDecodeError):
            return raw.decode("utf-8", "replace")

    def item(self) -> object:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in _PLACEHOLDERS:
            return _PLACEHOLDERS[kind]
        if kind == 255:  # REFSXP
            index = (flags >> 8) or self.int()
            if not 0 < index <= len(self.refs):
                raise ImpruneError(f"bad R reference index {index} ({len(self.refs)} known)")
            return self.refs[index - 1]
        if kind in (249, 248, 247):  # NAMESPACESXP, PACKAGESXP, PERSISTSXP
            if self.int() != 0:
                raise ImpruneError("bad string vector in an R placeholder")
            obj = RPersistent({249: "namespace", 248: "package", 247: "persist"}[kind],
                              [self.item() for _ in range(self.int())])
            self.refs.append(obj)
            return obj
        if kind == 1:  # SYMSXP: a CHARSXP follows
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if kind == 4:  # ENVSXP
            env = REnvironment()
            self.refs.append(env)
            env.locked = bool(self.int())
            env.enclos, frame, hashtab, attrs = self.item(), self.item(), self.item(), self.item()
            for part in (frame, *(hashtab if isinstance(hashtab, list) else ())):
                env.frame.update(_as_dict(part))
            env.attributes = _as_dict(attrs)
            return env
        if kind == 2:  # LISTSXP: walk the cdr chain iteratively
            values: list[object] = []
            tags: list[str | None] = []
            attrs: dict[str, object] = self.attributes(flags)  # the first cell's are the list's
            while kind == 2:
                if values and has_attr:
                    self.item()
                tags.append(self.item() if has_tag else None)
                values.append(self.item())
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != 254:
                raise ImpruneError(f"unsupported R pairlist tail of SEXP type {_type_name(kind)}")
            return RList(values, {**attrs, **({"names": tags} if any(t is not None for t in tags) else {})})
        if kind == 9:  # CHARSXP
            return self.charsxp(flags)
        if kind in (10, 13, 14, 15, 16, 19, 20, 24):
            n = self.length()
            if kind in (10, 13):  # LGLSXP, INTSXP
                values = self.ints(n)
            elif kind == 14:  # REALSXP
                values = self.doubles(n)
            elif kind == 15:  # CPLXSXP
                parts = self.doubles(2 * n)
                values = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
            elif kind == 16:  # STRSXP
                values = [self.charsxp(self._element_flags()) for _ in range(n)]
            elif kind == 24:  # RAWSXP
                values = bytes(int(t, 16) for t in (self._token() for _ in range(n))) if self.ascii \
                    else self._take(n)
            else:  # VECSXP, EXPRSXP
                values = [self.item() for _ in range(n)]
            attrs = self.attributes(flags)
            return RList(values, attrs) if attrs else values
        raise ImpruneError(f"unsupported R object of SEXP type {_type_name(kind)} ({kind}) in this data")


def _as_dict(obj: object) -> dict[str, object]:
    """A decoded attribute pairlist as name -> value ({} for NULL)."""
    return dict(zip(obj.names, obj)) if isinstance(obj, RList) and obj.names else {}


def read_serialized(data: bytes) -> object:
    """Decode one R serialized stream (``serialize()``, or a decompressed ``.rds`` / ``.rdb`` record)."""
    reader = _Reader(bytes(data))
    reader.header()
    return reader.item()


def _decompress_record(blob: bytes, compressed: int) -> bytes:
    if compressed == 0:
        return blob
    if len(blob) < 5:
        raise ImpruneError("truncated R lazy-load record")
    size, kind, payload = struct.unpack(">I", blob[:4])[0], b"Z", blob[4:]
    if compressed in (2, 3):
        kind, payload = blob[4:5], blob[5:]
    decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    if kind not in decoders:
        raise ImpruneError(f"unknown R lazy-load compression type {kind!r}")
    out = decoders[kind](payload)
    if len(out) != size:
        raise ImpruneError(f"R lazy-load record inflated to {len(out)} bytes, header says {size}")
    return out


def _read_index(rdx: Path) -> RList:
    blob = Path(rdx).read_bytes()
    for magic, decompress in ((b"\x1f\x8b", gzip.decompress), (b"BZh", bz2.decompress),
                              (b"\xfd7zXZ\x00", lzma.decompress), (b"X\n", bytes), (b"A\n", bytes)):
        if blob.startswith(magic):
            blob = decompress(blob)
            break
    else:  # not a compressed .rds-style file: a lazy-load record (4-byte length + zlib)
        blob = _decompress_record(blob, 1)
    index = read_serialized(blob)
    if not isinstance(index, RList) or "variables" not in (index.names or ()):
        raise ImpruneError(f"{rdx} is not an R lazy-load index (no 'variables' entry)")
    return index


def _load(rdx: Path, rdb: Path, names: list[str] | None) -> dict[str, object]:
    index = _read_index(rdx).to_dict()
    variables = index["variables"]
    table = variables.to_dict() if isinstance(variables, RList) and variables.names else {}
    flag = index.get("compressed") or [1]
    compressed = int(flag[0] if isinstance(flag, list) else flag)
    missing = [n for n in names or () if n not in table]
    if missing:
        raise ImpruneError(f"no object {missing[0]!r} in {rdx}; it holds {', '.join(map(str, table))}")
    out: dict[str, object] = {}
    with open(rdb, "rb") as fh:
        for name in names if names is not None else list(table):
            offset, size = (int(v) for v in table[name][:2])
            fh.seek(offset)
            blob = fh.read(size)
            if len(blob) != size:
                raise ImpruneError(f"{rdb} is truncated: {name!r} needs bytes {offset}..{offset + size}")
            out[str(name)] = read_serialized(_decompress_record(blob, compressed))
    return out


def read_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Every object of an R lazy-load database, name -> decoded value, in index order."""
    return _load(Path(rdx), Path(rdb), None)


def read_lazyload_object(rdx: Path, rdb: Path, name: str) -> object:
    """One object of an R lazy-load database by name (``ImpruneError`` listing the names if absent)."""
    return _load(Path(rdx), Path(rdb), [name])[name]
