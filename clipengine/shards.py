"""WebDataset shards read as streams, wherever they live: S3, GCS, HTTP(S) through fsspec, any command
(``pipe:CMD``), or a local disk.

A shard is read once, front to back, as the tar stream it is: no index of its members, no random access,
so the same code reads an object store, a web server and ``pipe:aws s3 cp ... -``. What can go wrong on the
way is a `ShardFault` (a 404, a connection reset, a stream that stops, a server silent for `timeout`
seconds, a command that exits non-zero), which the caller retries or skips: `clipengine.training.stream`.
What must stop a run before its first step (no credentials, no backend for the protocol, no shard readable
at all) is a `BadInput` from `check_readable`, raised in the main process with one line.

The img2dataset layout is read as it is: ``00000.tar`` holding ``000000000.jpg`` + ``.txt`` (+ ``.json``),
with ``sizes.json`` (open_clip's) or ``00000_stats.json`` (img2dataset's) giving each shard's sample count.
"""

from __future__ import annotations

import json
import os
import posixpath
import queue
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from clipengine.errors import BadInput
from clipengine.formats import IMAGE_EXTENSIONS
from clipengine.pairs import clean_captions, expand_braces, member_captions, split_key

PIPE = "pipe:"
CHUNK = 1 << 20  # bytes a reader thread hands over at a time
READ_AHEAD = 8  # chunks read ahead of the tar parser: the network overlaps decoding
DEFAULT_TIMEOUT = 60.0  # seconds without a byte before a shard counts as stalled
# the packages fsspec needs for each protocol, named in the error when one is missing
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
            "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                     "DefaultCredentialsError", "RefreshError", "NoAuthTokenError"}
TIMEOUT_ERRORS = {"ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError"}  # botocore's, aiohttp's
HOW_TO_SIGN_IN = {"s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (`aws configure`)",
                  "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"}


class ShardFault(Exception):
    """A shard could not be read (to the end): the reason, in one line."""


def is_streamed(data: str) -> bool:
    """Whether `--data` names shards to stream (a URL or a command) rather than local data."""
    return data.startswith(PIPE) or "://" in data.split("{", 1)[0]


def shard_names(pattern: str) -> list[str]:
    """The shards a brace pattern names (a ``pipe:`` command's braces too: one command per shard)."""
    return expand_braces(pattern)


def shard_label(shard: str) -> str:
    """What a shard is called in seeds and sample keys: its file name, so that the same shard read from S3,
    over HTTP or from a disk gets the same crops and caption choices (and runs on each are comparable)."""
    target = next((w for w in reversed(shlex.split(shard[len(PIPE):])) if w.endswith(".tar")), shard) \
        if shard.startswith(PIPE) else shard
    return posixpath.basename(target.rstrip("/")) or shard


def _protocol(shard: str) -> str:
    return "pipe" if shard.startswith(PIPE) else shard.split("://", 1)[0] if "://" in shard else "file"


def _storage_options(protocol: str, timeout: float) -> dict[str, Any]:
    """Timeouts at the protocol level too, so that a reader thread given up on ends with its connection."""
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                   sock_read=timeout)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": 1}}}  # the retries are ours, with backoff
    return {}


def _open_fsspec(shard: str, timeout: float) -> IO[bytes]:
    import fsspec

    protocol = _protocol(shard)
    try:
        # a file system of its own: fsspec's cached one would keep credentials found missing by an earlier call
        fs, path = fsspec.core.url_to_fs(shard, skip_instance_cache=True, **_storage_options(protocol, timeout))
    except ImportError as e:
        package = BACKENDS.get(protocol, "the fsspec backend")
        raise BadInput(f"{protocol}:// needs {package}: pip install {package} ({e})") from None
    except ValueError as e:  # an unknown protocol
        raise BadInput(f"cannot stream {shard}: {e}") from None
    # HTTP: one streamed GET (block_size 0), not a HEAD and ranged reads; object stores: large sequential reads
    return fs.open(path, "rb", block_size=0 if protocol in ("http", "https") else 8 << 20)


class _Command:
    """A ``pipe:`` command's standard output; its exit status is checked at the end of the stream."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.stderr = tempfile.TemporaryFile()  # a pipe could fill and block the command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr)

    def read(self, n: int) -> bytes:
        assert self.process.stdout is not None
        data = self.process.stdout.read(n)
        if not data:
            code = self.process.wait()
            if code:
                self.stderr.seek(0)
                lines = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise ShardFault(f"`{self.command}` exited with {code}" + (f": {lines[-1]}" if lines else ""))
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class ShardStream:
    """A shard's bytes, read by a thread `READ_AHEAD` chunks ahead of whoever parses them.

    The thread is also the watchdog: a read that gives nothing for `timeout` seconds raises `ShardFault` here
    (whatever the protocol, a command included), and the stalled source is closed and left to its thread.
    """

    def __init__(self, shard: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.shard, self.timeout = shard, timeout
        self._chunks: queue.Queue = queue.Queue(READ_AHEAD)
        self._buffer = memoryview(b"")
        self._done = False
        self._closed = threading.Event()
        self._source: Any = None
        threading.Thread(target=self._read_all, daemon=True, name=f"shard {shard_label(shard)}").start()

    def _read_all(self) -> None:
        try:
            self._source = _Command(self.shard[len(PIPE):]) if self.shard.startswith(PIPE) \
                else _open_fsspec(self.shard, self.timeout)
            while not self._closed.is_set():
                data = self._source.read(CHUNK)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # noqa: B036 - handed to the reader, which raises it as a fault
            self._put(e)
        finally:
            if self._source is not None:
                try:
                    self._source.close()
                except Exception:  # noqa: S110 - closing a failed source: nothing left to report
                    pass

    def _put(self, item: bytes | BaseException) -> None:
        while not self._closed.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left for a negative n); b"" at the end."""
        parts = []
        want = n if n >= 0 else float("inf")
        got = 0
        while got < want:
            if not self._buffer:
                if self._done:
                    break
                try:
                    item = self._chunks.get(timeout=self.timeout)
                except queue.Empty:
                    self.close()
                    raise ShardFault(f"no data for {self.timeout:g} s") from None
                if isinstance(item, BaseException):
                    self._done = True
                    if isinstance(item, BadInput | ShardFault):
                        raise item
                    if isinstance(item, TimeoutError) or type(item).__name__ in TIMEOUT_ERRORS:
                        raise ShardFault(f"no data for {self.timeout:g} s") from item
                    raise ShardFault(_describe(item)) from item
                if not item:
                    self._done = True
                    break
                self._buffer = memoryview(item)
            take = self._buffer[:int(min(want - got, len(self._buffer)))]
            self._buffer = self._buffer[len(take):]
            parts.append(bytes(take))
            got += len(take)
        return b"".join(parts)

    def close(self) -> None:
        self._closed.set()
        source = self._source
        if isinstance(source, _Command):
            source.close()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


BLOCK = 512
_END_OF_ARCHIVE = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular and contiguous files; links, folders and devices are passed over


def _read_exact(stream: IO[bytes] | ShardStream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # a pipe or socket may give less than asked before its end
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _header_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a pax extended header ("<length> path=<name>\n" records)."""
    for record in records.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", "replace")
    return None


def tar_members(stream: IO[bytes] | ShardStream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of a tar stream, in order; a `ShardFault` when it stops early.

    Written here rather than taken from `tarfile`, whose stream mode parsed each header in Python at 86 us,
    18% of a data worker's time on 128-px images: this reads ustar, GNU long names and pax paths, as
    Python's tarfile, GNU tar and img2dataset write them.
    """
    long_name: str | None = None
    while True:
        header = _read_exact(stream, BLOCK)
        if not header or header == _END_OF_ARCHIVE:
            return
        if len(header) < BLOCK:
            raise ShardFault("the stream ended inside a tar header")
        try:
            checksum = _header_number(header[148:156])
            size = _header_number(header[124:136])
        except ValueError:
            checksum = size = -1
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ShardFault("not a readable tar stream (a header's checksum is wrong)")
        kind = header[156:157]
        name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not long_name and header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        data = _read_exact(stream, size)
        if len(data) < size:
            raise ShardFault(f"the stream ended inside {name}")
        _read_exact(stream, -size % BLOCK)  # padding to the next header
        if kind == b"L":  # GNU long name: the next member's
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":  # pax: the next member's path, maybe
            long_name = _pax_path(data)
        elif kind != b"g":
            long_name = None
            if kind in _REGULAR:
                yield name, data


def tar_samples(stream: IO[bytes] | ShardStream) -> Iterator[Sample]:
    """The samples of a tar stream, in order: consecutive members sharing a key (the path up to the first
    dot of the file name, WebDataset's rule) form one sample. A sample is given only once complete, so a
    stream that stops mid-sample never gives a partial one."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    for name, data in tar_members(stream):
        name_key, ext = split_key(name)
        if name_key != key:
            if key is not None:
                yield key, parts
            key, parts = name_key, {}
        parts[ext] = data
    if key is not None:
        yield key, parts


def image_and_captions(parts: dict[str, bytes]) -> tuple[bytes, list[str]] | str:
    """A sample's image bytes and captions (a ``.txt`` member's lines, or a ``.json`` member's ``caption``),
    or why it cannot be trained on."""
    image = next((parts[ext] for ext in parts if "." + ext in IMAGE_EXTENSIONS), None)
    if image is None:
        return "no image member"
    ext = "txt" if "txt" in parts else "json" if "json" in parts else None
    try:
        captions = member_captions(ext, parts[ext]) if ext else []
    except ValueError:
        return "unreadable json member"
    captions = clean_captions(captions)
    return (image, captions) if captions else "empty caption"


# --------------------------------------------------------------------------------------------------
# Before the first step: sizes, access
# --------------------------------------------------------------------------------------------------


def _read_small(url: str, timeout: float) -> bytes:
    with ShardStream(url, timeout) as stream:
        return stream.read()


def _stats_url(shard: str) -> str:
    return shard[: -len(".tar")] + "_stats.json" if shard.endswith(".tar") else shard + "_stats.json"


def _count_local(shard: str) -> int:
    with open(shard, "rb") as f:
        return sum(1 for _ in tar_samples(f))


def read_sizes(shards: list[str], timeout: float = DEFAULT_TIMEOUT) -> list[int] | None:
    """Each shard's sample count, or None where it cannot be known without reading every shard.

    In order: ``sizes.json`` beside the first shard (open_clip's: {file name: count}), img2dataset's
    ``<shard>_stats.json`` (``successes``) beside each, and for local shards a count of their headers.
    """
    if any(s.startswith(PIPE) for s in shards):
        return None
    folder = posixpath.dirname(shards[0]) if "://" in shards[0] else os.path.dirname(shards[0])
    try:
        sizes = json.loads(_read_small(posixpath.join(folder, "sizes.json") if "://" in shards[0]
                                       else os.path.join(folder, "sizes.json"), timeout))
        return [int(sizes[posixpath.basename(s)]) for s in shards]
    except (ShardFault, BadInput, ValueError, KeyError, TypeError):
        pass
    def successes(shard: str) -> int:
        return int(json.loads(_read_small(_stats_url(shard), timeout))["successes"])

    try:
        first = successes(shards[0])  # only then ask for the others: no 40,000 requests for files that are not there
        with ThreadPoolExecutor(32) as pool:
            return [first, *pool.map(successes, shards[1:])]
    except (ShardFault, BadInput, ValueError, KeyError, TypeError):
        pass
    if all(os.path.isfile(s) for s in shards):
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(_count_local, shards))
    return None


def _credentials_problem(error: BaseException | None) -> str | None:
    while error is not None:
        if type(error).__name__ in CREDENTIAL_ERRORS:
            return _describe(error)
        error = error.__cause__ or error.__context__
    return None


def check_readable(shards: list[str], timeout: float = DEFAULT_TIMEOUT, tries: int = 3) -> None:
    """Read the first tar header of the first shards; raise a one-line `BadInput` when the data cannot be read
    at all: no credentials, no backend for the protocol, or none of the first `tries` shards readable (a wrong
    URL or a server that is down), rather than fail every shard in every worker after step 1."""
    reasons = []
    for shard in shards[:tries]:
        try:
            with ShardStream(shard, timeout) as stream:
                next(tar_samples(stream), None)
            return
        except ShardFault as e:
            protocol = _protocol(shard)
            if (problem := _credentials_problem(e)) is not None:
                raise BadInput(f"no credentials to read {shard} ({problem}): "
                               f"{HOW_TO_SIGN_IN.get(protocol.rstrip('a'), 'configure access for ' + protocol)}") from None
            reasons.append(f"{shard}: {e}")
    raise BadInput(f"cannot read the training data: {reasons[0]}"
                   + (f" (and the next {len(reasons) - 1} shards)" if len(reasons) > 1 else ""))
