"""8-bit and 4-bit weights for decoding, made from a checkpoint once and cached.

    from model import quantize
    q = quantize.load_or_make(weights, m.path, "q4")   # Quantized: .arrays, .path, .made
    q = quantize.ensure(m, "q8")                         # the same from a loaded Model
    qm = quantize.load_quantized("gpt2ja-small-dir", "q4")  # QuantizedModel: no TensorFlow
                                                         # when the cache file is there

The format is ONNX Runtime's ``MatMulNBits`` (``com.microsoft``): each weight
matrix W [K in, N out] is stored transposed as N rows of K values, cut into
blocks of ``BLOCK`` (32) values along K; every block has one float32 scale
and its values are rounded to ``round(w / scale)``, stored with an offset
(128 for 8 bits, 8 for 4 bits: the op's implicit zero point), two 4-bit
values per byte (even k in the low nibble).  The scale is the block's value
of largest magnitude divided by -128 (q8) or -8 (q4), as llama.cpp's Q8_0 /
Q4_0 do, so that all 256 / 16 levels are used: that value is exact and
the others lie in [-8, 8) steps (the rare +8 is clipped to 7).  On a
fine-tuned tiny model this gave q4 a mean KL divergence of 0.011 against
0.014 for the symmetric max/7 scale.  Quantized are the four matrices of every block and the
token embedding (the tied output projection, ``wte`` [V, E], already N x K);
biases, layer norms and the position embedding stay float32, and the token
embedding for the input (one row gathered per token) is kept as float16.
A cache file holds all of them and the hyperparameters, so that a quantized
model decodes from its cache file alone (``load_quantized``: no TensorFlow,
no float32 copy of the weights in memory).

Cache: one ``.npz`` file per checkpoint and format, named by a key of the
checkpoint (sha256 of its ``.index`` file and its ``hparams.json``, the data files'
names, sizes and modification times, the format, the block size and this
module's ``VERSION``).  It is written beside the checkpoint (``DIR/quantized/``) when
that directory is writable, else under the model cache
(``$GPT2JA_HOME/quantized``, default ``$XDG_CACHE_HOME/gpt2-japanese`` or
``~/.cache/gpt2-japanese``), atomically, under a temporary name renamed over
the file name: a symbolic link placed at that name (a shared ``$GPT2JA_HOME``)
is replaced by the file, its target is never opened or written, and a link is
never read (``O_NOFOLLOW``).  A cache file is used only when it names the same
key, format, block size and version and holds every array with the expected
shape and type; every member's declared size is checked against the file's
size and its numpy header against the shape the hparams give *before* anything
is allocated (a crafted file declaring 10**13 elements is just invalid), and
the zip checksums are verified on reading.  Anything else -- a truncated or
corrupted file, one made for another checkpoint -- is made again and replaced,
never trusted.

A valid cache file is not read into memory: once its members' checksums are
verified (read through, nothing kept), the file is mapped read-only and its
arrays are views of the mapping (``Quantized.stored`` says where each lies),
so that only the pages looked up cost memory (a few rows of the input
embedding per token); ONNX Runtime reads the weights of its graph from the
file itself (``model.ortdecode``) and lets each matrix go once it has packed
it.  The file is checked to be the same one -- a regular file, not a link,
same device, inode, size and times -- before and after ONNX Runtime reads it.
Like any mapped file it must not be rewritten in place while a process
decodes from it; this package never does (it writes a new file and renames it
over the name).

The checksums are read through once per file: after a file passed, a record under the model cache
(``$GPT2JA_HOME/quantized/checked/NAME-HASH.json``, by the file's absolute path) holds its device,
inode, size, modification and change times, and while the file still has exactly these, later
starts check its structure and every header as above but do not read the arrays through again
(medium q8, 371 MB: 0.26 s of each start).  Any write to the file -- even one that restores its
size and modification time -- changes its change time, which no user can set back, so the next
start reads it through again.  A record that is missing, unreadable, a link or for other stamps
is ignored.

The data files' contents: the key reads their size and modification time
only, which a file rewritten in place with both restored would pass.  So the
cache file also records each data file's stamp -- size, modification *and
change* time (st_ctime, which no user can set back), inode, device -- and a
sha256 of their contents computed when the file is made.  When the stamps
match, nothing more is read; when they differ (the file was rewritten, or
just copied, ``chmod``-ed or restored from a backup) the data files are hashed
again (0.95-1.8 s per 400-470 MB, the small model, on a loaded 2-core reference machine): the
same contents -> the cache file is used and its stamps refreshed; other
contents -> it is made again.  Beside the checkpoint, a new file replaces the
files that earlier contents of the same checkpoint left there.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import mmap
import os
import stat as _stat
import zipfile
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from util import files as _files

from .errors import ModelError
from .hparams import HParams, variable_shapes

FORMATS = ("q8", "q4")
BITS = {"q8": 8, "q4": 4}
BLOCK = 32
VERSION = 4
SUBDIR = "quantized"
_META = "__meta__"


def quantize_matrix(wt: np.ndarray, bits: int, block: int = BLOCK) -> Tuple[np.ndarray, np.ndarray]:
    """wt [N, K] float32 -> (q uint8 [N, ceil(K/block), block*bits/8], scales float32 [N*ceil(K/block)]).

    Per block: scale = (the value of largest magnitude) / -2**(bits-1) (negative for a positive
    extreme), q = clip(round(w / scale) + 2**(bits-1), 0, 2**bits - 1) (MatMulNBits' implicit
    zero point); K is padded with zeros to a whole number of blocks."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    wt = np.asarray(wt, dtype=np.float32)
    N, K = wt.shape
    nb = -(-K // block)
    if nb * block != K:
        wt = np.concatenate([wt, np.zeros((N, nb * block - K), np.float32)], axis=1)
    wb = wt.reshape(N, nb, block)
    half = np.float32(2 ** (bits - 1))
    extreme = np.take_along_axis(wb, np.abs(wb).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    scale = extreme / -half
    scale[scale == 0] = 1.0
    q = wb / scale[:, :, None]
    np.rint(q, out=q)
    q += half
    np.clip(q, 0, 2 ** bits - 1, out=q)
    q = q.astype(np.uint8)
    if bits == 4:
        q = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale.reshape(-1), dtype=np.float32)


def dequantize_matrix(q: np.ndarray, scales: np.ndarray, bits: int, K: int) -> np.ndarray:
    """The float32 [N, K] matrix that (q, scales) stand for (for checks and tests)."""
    N, nb = q.shape[0], q.shape[1]
    if bits == 4:
        v = np.empty((N, nb, q.shape[2] * 2), np.float32)
        v[:, :, 0::2] = q & 0x0F
        v[:, :, 1::2] = q >> 4
    else:
        v = q.astype(np.float32)
    v -= np.float32(2 ** (bits - 1))
    v *= scales.reshape(N, nb, 1)
    return v.reshape(N, -1)[:, :K]


#: The quantized matrices: name in the cache -> (checkpoint weight name, transposed to [N, K]?).
def matrix_names(hp: HParams) -> Dict[str, Tuple[str, bool]]:
    names = {}
    for i in range(hp.n_layer):
        for k in ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w"):
            names[f"h{i}/{k}"] = (f"model/h{i}/{k}", True)  # stored [in=K, out=N]
    names["wte"] = ("model/wte", False)  # [V=N, E=K]: logits = x @ wte.T
    return names


def float_shapes(hp: HParams) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """The arrays kept in floating point beside the quantized matrices: checkpoint name -> (shape,
    dtype).  ``model/wte`` (float16) is the input embedding only; the output projection is ``wte/q``."""
    out = {"model/wte": ((hp.n_vocab, hp.n_embd), "float16"), "model/wpe": ((hp.n_ctx, hp.n_embd), "float32")}
    for name, shape in variable_shapes(hp).items():
        if len(shape) == 1:  # biases and layer norms
            out[name] = (shape, "float32")
    return out


def expected_shapes(hp: HParams, fmt: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Every array a cache file of ``fmt`` holds for hparams ``hp``: name -> (shape, dtype)."""
    bits = BITS[fmt]
    E, V = hp.n_embd, hp.n_vocab
    kn = {"attn/c_attn/w": (E, 3 * E), "attn/c_proj/w": (E, E), "mlp/c_fc/w": (E, 4 * E),
          "mlp/c_proj/w": (4 * E, E)}
    out = {}
    for name in matrix_names(hp):
        K, N = (E, V) if name == "wte" else kn[name.split("/", 1)[1]]
        nb = -(-K // BLOCK)
        out[name + "/q"] = ((N, nb, BLOCK * bits // 8), "uint8")
        out[name + "/s"] = ((N * nb,), "float32")
    out.update(float_shapes(hp))
    return out


def quantize_weights(weights, hp: HParams, fmt: str) -> Dict[str, np.ndarray]:
    """The quantized arrays (``name/q``, ``name/s``) of ``weights`` (checkpoint names -> float32 arrays,
    conv1d weights as [in, out], e.g. ``npdecode.cpu_weights(m)``), and the arrays of
    ``float_shapes`` (copies, in their types)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    out = {name: np.array(weights[name], dtype=dtype) for name, (_, dtype) in float_shapes(hp).items()}
    for name, (source, transpose) in matrix_names(hp).items():
        w = np.asarray(weights[source], dtype=np.float32)
        q, s = quantize_matrix(np.ascontiguousarray(w.T) if transpose else w, BITS[fmt])
        out[name + "/q"], out[name + "/s"] = q, s
    return out


# -- the cache ----------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """The model cache (what ``hub.cache_dir()`` gives, computed from the same variables):
    ``$GPT2JA_HOME``, else ``$XDG_CACHE_HOME/gpt2-japanese`` (absolute only), else
    ``~/.cache/gpt2-japanese``."""
    home = os.environ.get("GPT2JA_HOME")
    if home:
        return Path(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "gpt2-japanese"
    return Path(os.path.expanduser("~/.cache/gpt2-japanese"))


def checkpoint_key(prefix: str | os.PathLike, fmt: str) -> str:
    """A key of the checkpoint ``prefix`` (``DIR/model-N``) and the format: sha256 over the ``.index``
    file's bytes, each data file's name, size and modification time, the format, block size and
    VERSION.  Cheap: the data files are not read."""
    prefix = str(prefix)
    h = hashlib.sha256()
    try:
        with open(prefix + ".index", "rb") as f:
            h.update(f.read())
        hparams_file = os.path.join(os.path.dirname(prefix), "hparams.json")
        if os.path.isfile(hparams_file):
            with open(hparams_file, "rb") as f:
                h.update(b"\0hparams.json\0" + f.read())
        for data in sorted(glob.glob(glob.escape(prefix) + ".data-*")):
            st = os.stat(data)
            h.update(f"\0{os.path.basename(data)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {prefix}: {e.strerror or e}") from None
    h.update(f"\0{fmt}\0{BLOCK}\0{VERSION}".encode())
    return h.hexdigest()


def cache_file_name(prefix: str | os.PathLike, fmt: str, key: str) -> str:
    return f"{os.path.basename(str(prefix))}.{fmt}-{key[:24]}.npz"


def cache_candidates(prefix: str | os.PathLike, fmt: str, key: str,
                     cache_root: Optional[str | os.PathLike] = None) -> Tuple[Path, Path]:
    """Where the cache file may be: beside the checkpoint, and under the model cache."""
    name = cache_file_name(prefix, fmt, key)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return Path(os.path.dirname(os.path.abspath(str(prefix)))) / SUBDIR / name, root / SUBDIR / name


class Stored(NamedTuple):
    """Where a checked cache file holds its arrays: ``members`` name -> (offset, length) of each
    array's bytes in the file, and ``ident`` the file's (device, inode, size, modification and
    change time) when it was checked (see ``still_there``).  What lets ONNX Runtime read the
    weights from the file itself (``model.ortdecode``)."""

    members: Dict[str, Tuple[int, int]]
    ident: Tuple[int, ...]


class Quantized(NamedTuple):
    """Quantized weights: ``arrays`` (``name/q``, ``name/s``), the cache ``path`` they were read from
    or written to (None when not cached), ``made`` (True when they were quantized now), and
    ``stored`` (``Stored``: where the arrays lie in the file at ``path``, whose mapping they are; None
    when they are in memory)."""

    fmt: str
    arrays: Dict[str, np.ndarray]
    path: Optional[Path]
    made: bool
    stored: Optional[Stored] = None


def data_stamps(prefix: str | os.PathLike) -> list:
    """Each data file of the checkpoint ``prefix``: [name, size, mtime_ns, ctime_ns, inode, device]
    (what tells, without reading it, that a file is the very one a cache file was made from)."""
    out = []
    try:
        for data in sorted(glob.glob(glob.escape(str(prefix)) + ".data-*")):
            st = os.stat(data)
            out.append([os.path.basename(data), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {prefix}: {e.strerror or e}") from None
    return out


def data_digest(prefix: str | os.PathLike) -> str:
    """sha256 over the checkpoint's data files (name and contents, in name order)."""
    h = hashlib.sha256()
    try:
        for data in sorted(glob.glob(glob.escape(str(prefix)) + ".data-*")):
            h.update(f"\0{os.path.basename(data)}\0".encode())
            with open(data, "rb") as f:
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    h.update(chunk)
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {prefix}: {e.strerror or e}") from None
    return h.hexdigest()


def _meta(key: str, fmt: str, hp: HParams, data: Optional[dict] = None) -> dict:
    meta = {"key": key, "format": fmt, "block": BLOCK, "version": VERSION, "hparams": hp.to_dict()}
    if data is not None:
        meta["data"] = data
    return meta


#: The largest metadata member a cache file may declare (it is a few kB).
_MAX_META = 1 << 20


def _member_header(f, shape: Optional[tuple], dtype: str, limit: int, size: int):
    """(shape, dtype, bytes) of the ``.npy`` array whose stream ``f`` is at its start (a member of
    ``size`` bytes), the stream then at the array's first byte; None when the header is not a
    C-order array of ``dtype`` (and of ``shape``, unless None) whose bytes fill the member exactly,
    or when it holds more than ``limit`` bytes."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    if fortran or hdtype != np.dtype(dtype) or (shape is not None and tuple(hshape) != tuple(shape)):
        return None
    count = 1
    for d in hshape:
        count *= int(d)
    nbytes = count * hdtype.itemsize
    if nbytes > limit or f.tell() + nbytes != size:
        return None
    return tuple(hshape), hdtype, nbytes


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, shape: Optional[tuple], dtype: str,
                 limit: int) -> Optional[np.ndarray]:
    """The array stored in member ``info`` (a ``.npy`` file), read into memory, or None (see
    ``_member_header``).  Nothing is allocated before the sizes are known to agree; reading to the
    end verifies the member's CRC (BadZipFile otherwise)."""
    with z.open(info) as f:
        header = _member_header(f, shape, dtype, limit, info.file_size)
        if header is None:
            return None
        hshape, hdtype, nbytes = header
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            chunk = f.read(min(nbytes - got, 1 << 24))
            if not chunk:
                return None
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
        if f.read(1):  # (also reaches the end, where the CRC is checked)
            return None
        return np.frombuffer(buf, dtype=hdtype).reshape(hshape)


#: The bytes read at a time to check a member's CRC.
_CHUNK = 1 << 20


def _check_member(f, z: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple, dtype: str,
                  size: int, read_through: bool = True) -> Optional[Tuple[int, int]]:
    """(offset in the file, length) of the bytes of the array stored in member ``info``, after
    reading it through (its CRC checked, nothing kept; not with ``read_through`` False: a file
    whose checksums passed before, unchanged since), or None (see ``_member_header``).  The
    member is stored (not compressed), so its bytes lie in the file as they are: after its local
    header (read from ``f``, the zip file), its name and extra field, and the ``.npy`` header."""
    with z.open(info) as m:
        header = _member_header(m, shape, dtype, size, info.file_size)
        if header is None:
            return None
        start, nbytes = m.tell(), header[2]
        if read_through:
            buf = bytearray(min(_CHUNK, max(nbytes, 1)))
            while m.readinto(buf):  # to the end, where the CRC is checked
                pass
    f.seek(info.header_offset)  # (the zip file object seeks to each member itself)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":  # a local file header
        return None
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + start
    if offset + nbytes > size:
        return None
    return offset, nbytes


def _file_ident(st: os.stat_result) -> Tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _checked_path(path: Path, cache_root=None) -> Path:
    """Where the record of ``path``'s checked checksums lies: under the model cache, named by the
    file's name and its absolute path (cache files of different directories share names)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    where = os.path.abspath(path)
    digest = hashlib.sha256(os.fsencode(where)).hexdigest()[:24]
    return root / SUBDIR / "checked" / f"{os.path.basename(where)}-{digest}.json"


def _checked_record(path: Path, ident: Tuple[int, ...]) -> dict:
    return {"file": os.path.abspath(path), "ident": list(ident), "version": VERSION}


def _was_checked(path: Path, ident: Tuple[int, ...], cache_root=None) -> bool:
    """Whether ``path``'s checksums were read through when it had exactly the stamps ``ident``."""
    return _files.read_record(_checked_path(path, cache_root)) == _checked_record(path, ident)


def _remember_checked(path: Path, ident: Tuple[int, ...], cache_root=None) -> None:
    """Record that ``path``'s checksums passed while it had the stamps ``ident`` (nothing when the
    record cannot be written: the next start reads the file through again)."""
    _files.write_record(_checked_path(path, cache_root), _checked_record(path, ident))


def still_there(path: str | os.PathLike, stored: "Stored") -> bool:
    """Whether ``path`` is still the very regular file (not a symbolic link) whose arrays were
    checked and mapped: same device, inode, size, modification and change times."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return _stat.S_ISREG(st.st_mode) and _file_ident(st) == stored.ident


def _read_cache(path: Path, hp: Optional[HParams], fmt: str, key: str, cache_root=None):
    """(hparams, arrays, meta, stored) of the cache file ``path`` when it is what ``key``/``fmt``/``hp``
    ask for, structurally sound, with every array of the expected shape and type (and its CRC
    right: read through unless it was, unchanged since -- see the module); else None.  The arrays
    are read-only views of the file mapped into memory (``stored`` says where each lies in it): only
    the pages read cost memory."""
    f = _files.open_regular(path)
    if f is None:
        return None
    try:
        with f, zipfile.ZipFile(f) as z:
            st = os.fstat(f.fileno())
            size = st.st_size
            ident = _file_ident(st)
            checked = _was_checked(path, ident, cache_root)
            infos = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in z.infolist()}
            if len(infos) != len(z.infolist()) or _META not in infos:
                return None
            total = 0
            for info in infos.values():  # np.savez stores members uncompressed: sizes are bytes on disk
                if (info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
                        or info.header_offset + info.file_size > size):
                    return None
                total += info.file_size
            if total > size:
                return None
            raw = _read_member(z, infos[_META], None, "uint8", _MAX_META)
            if raw is None or raw.ndim != 1:
                return None
            meta = json.loads(raw.tobytes().decode())
            if not isinstance(meta, dict):
                return None
            try:
                stored = HParams.from_dict(meta.get("hparams"), source=str(path))
            except (ModelError, TypeError, AttributeError):
                return None
            if hp is not None and stored != hp:
                return None
            if {k: v for k, v in meta.items() if k != "data"} != _meta(key, fmt, stored):
                return None
            want = expected_shapes(stored, fmt)
            if set(infos) != set(want) | {_META}:
                return None
            members = {}
            for name, (shape, dtype) in want.items():
                where = _check_member(f, z, infos[name], shape, dtype, size, read_through=not checked)
                if where is None:
                    return None
                members[name] = where
            if not checked:
                _remember_checked(path, ident, cache_root)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the descriptor
            arrays = {name: np.frombuffer(mapped, dtype=want[name][1], count=members[name][1]
                                          // np.dtype(want[name][1]).itemsize,
                                          offset=members[name][0]).reshape(want[name][0])
                      for name in want}
            return stored, arrays, meta, Stored(members, ident)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return None


def _same_data(meta: dict, prefix) -> Optional[bool]:
    """Whether the checkpoint's data files are those the cache file was made from: True when their
    stamps are the recorded ones; else their contents are hashed: True (same contents, stamps to be
    refreshed: returned as None), False (other contents, or nothing recorded)."""
    data = meta.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        return False
    if data.get("stamps") == data_stamps(prefix):
        return True
    return None if data_digest(prefix) == data["sha256"] else False


def read_cache(path: Path, hp: Optional[HParams], fmt: str, key: str, prefix: Optional[str | os.PathLike] = None
               ) -> Optional[Tuple[HParams, Dict[str, np.ndarray]]]:
    """(hparams, arrays) of the cache file ``path``, or None when it is missing, a symbolic link or not
    a regular file, unreadable, corrupted (sizes, headers, zip checksums), or not exactly what key,
    format and hparams ask for -- or, given the checkpoint ``prefix``, made from other contents of its
    data files.  ``hp`` None: the hparams the file names (checked to be valid)."""
    found = _read_cache(path, hp, fmt, key)
    if found is None or (prefix is not None and _same_data(found[2], prefix) is False):
        return None
    return found[0], found[1]


def _read_any(candidates, hp: Optional[HParams], fmt: str, key: str, prefix,
              cache_root=None) -> Optional[Tuple[HParams, Quantized]]:
    """The first valid cache file among ``candidates`` (see ``read_cache``), as (hparams, Quantized).
    A file whose data stamps are out of date but whose contents match is written again with the
    current stamps (so that the contents are hashed once, not on every start)."""
    for path in candidates:
        found = _read_cache(path, hp, fmt, key, cache_root)
        if found is None:
            continue
        stored, arrays, meta, where = found
        same = _same_data(meta, prefix)
        if same is False:
            continue
        if same is None:
            data = {"stamps": data_stamps(prefix), "sha256": meta["data"]["sha256"]}
            with contextlib.suppress(OSError):
                _write_cache(path, arrays, _meta(key, fmt, stored, data))
                again = _read_cache(path, stored, fmt, key, cache_root)  # the new file's layout
                if again is not None:
                    arrays, where = again[1], again[3]
        return stored, Quantized(fmt, arrays, path, False, where)
    return None


def _write_cache(path: Path, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    """Write the cache file under a temporary name in its directory and rename it over ``path``: a
    symbolic link (or anything else) at ``path`` is replaced, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    _files.atomic_write(path, lambda f: np.savez(f, **payload), follow_symlinks=False)


def _remove_stale(path: Path, prefix, fmt: str) -> None:
    """Beside the checkpoint, remove this format's files of earlier contents of the same checkpoint
    (same name, another key: the checkpoint was overwritten).  Never under the shared model cache,
    where checkpoints of other directories may share the name."""
    for old in path.parent.glob(glob.escape(f"{os.path.basename(str(prefix))}.{fmt}-") + "*.npz"):
        if old != path:
            try:
                old.unlink()
            except OSError:
                pass


def load_or_make(weights, prefix: Optional[str | os.PathLike], fmt: str, hp: HParams,
                 cache_root: Optional[str | os.PathLike] = None) -> Quantized:
    """The ``fmt`` weights of the checkpoint ``prefix`` whose float32 weights are ``weights``:
    read from the cache when a valid file is there, else quantized now and written to the cache
    (beside the checkpoint when its directory is writable, else under ``cache_root``, default
    ``default_cache_root()``).  ``prefix`` None (weights without a checkpoint) quantizes without
    caching.  A cache that cannot be written anywhere is not an error: the weights are used anyway."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if prefix is None:
        return Quantized(fmt, quantize_weights(weights, hp, fmt), None, True)
    key = checkpoint_key(prefix, fmt)
    candidates = cache_candidates(prefix, fmt, key, cache_root)
    found = _read_any(candidates, hp, fmt, key, prefix, cache_root)
    if found is not None:
        return found[1]
    stamps = data_stamps(prefix)
    arrays = quantize_weights(weights, hp, fmt)
    meta = _meta(key, fmt, hp, {"stamps": stamps, "sha256": data_digest(prefix)})
    for path in candidates:
        try:
            _write_cache(path, arrays, meta)
        except OSError:
            continue
        if path == candidates[0]:
            _remove_stale(path, prefix, fmt)
        written = _read_cache(path, hp, fmt, key, cache_root)  # the file's mapping, as a later start has it
        if written is not None:
            return Quantized(fmt, written[1], path, True, written[3])
        return Quantized(fmt, arrays, path, True)
    return Quantized(fmt, arrays, None, True)


def ensure(m, fmt: str, cache_root: Optional[str | os.PathLike] = None) -> Quantized:
    """``load_or_make`` for a loaded Model ``m`` (its checkpoint is ``m.path``)."""
    from .npdecode import cpu_weights

    return load_or_make(cpu_weights(m), getattr(m, "path", None), fmt, m.hparams, cache_root)


class QuantizedModel:
    """A model to decode with 8-/4-bit weights only (``model.decoder(qm)`` gives its ``OnnxDecoder``):
    ``hparams``, ``path`` (the checkpoint prefix), ``device`` (always the CPU), ``fmt`` and
    ``quantized`` (the ``Quantized`` arrays).  Holds no float32 weight matrices and no TensorFlow
    objects; ``tasks.generate.Generator`` takes it like a ``Model``."""

    device = "/CPU:0"

    def __init__(self, hparams: HParams, path: str, quantized: Quantized):
        self.hparams, self.path, self.quantized = hparams, path, quantized
        self.fmt = quantized.fmt


def load_quantized(model_dir: str | os.PathLike, fmt: str,
                   cache_root: Optional[str | os.PathLike] = None) -> QuantizedModel:
    """The ``fmt`` model of a model directory, read from its cache file without TensorFlow when a
    valid one is there (see ``cache_candidates``); otherwise the checkpoint is loaded
    (``model.load``, TensorFlow), quantized and cached as ``load_or_make`` does, and its float32
    weights are let go.  ModelError for a directory that holds no checkpoint."""
    from .checkpoint import find_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    prefix = find_checkpoint(model_dir)
    key = checkpoint_key(prefix, fmt)
    found = _read_any(cache_candidates(prefix, fmt, key, cache_root), None, fmt, key, prefix, cache_root)
    if found is not None:
        return QuantizedModel(found[0], prefix, found[1])
    from .gpt2 import load

    m = load(model_dir)
    q = ensure(m, fmt, cache_root)
    hp = m.hparams
    del m
    return QuantizedModel(hp, prefix, q)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


__all__ = ["FORMATS", "BLOCK", "VERSION", "Quantized", "Stored", "still_there", "QuantizedModel", "load_quantized",
           "quantize_matrix", "dequantize_matrix", "quantize_weights",
           "load_or_make", "ensure", "checkpoint_key", "data_stamps", "data_digest", "default_cache_root", "read_cache",
           "relative_error"]
