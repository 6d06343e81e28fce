"""``meter-gateway import FILE``: backfill usage history through a running gateway's ingest API.

The file is CSV with a header or NDJSON (either gzip-compressed, told by the ``.gz`` extension
or the gzip magic bytes), one Paigo usage record per row or line. Records go to
``POST /v1/usage`` in batches, like any other client, so they are validated, deduplicated and
committed exactly as live usage is. Every record carries an id: its own ``id``, or one derived
from the file's name, the line number and the line's text, so sending a line again (a retry, a
resumed or repeated import) counts it once within the dedup window.

After each acknowledged batch the importer moves a small checkpoint beside the file
(``FILE.import-checkpoint``: last acknowledged line, counts, size of the rejected summary), so
an interrupted import resumes where it stopped instead of re-reading from the start. Rejected
lines are listed in ``FILE.rejected.ndjson`` (line number, record, field, reason, error). 429
and 503 are retried, honouring ``Retry-After``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from meter_gateway.billing.command import base_url
from meter_gateway.config import ConfigError

KEY_ENV = "METER_GATEWAY_API_KEY"
CHECKPOINT_SUFFIX = ".import-checkpoint"
REJECTED_SUFFIX = ".rejected.ndjson"
DEFAULT_BATCH = 1000
# Statuses that mean "later, not never": overload and a gateway draining or restarting.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 30.0
# How long an unreachable gateway is retried before the import stops (it can be resumed).
UNREACHABLE_GIVE_UP_S = 120.0
_GZIP_MAGIC = b"\x1f\x8b"
_METADATA_PREFIX = "metadata."

HELP = f"""\
Backfill usage history from FILE through the gateway's ingest API (POST /v1/usage).

FILE is CSV with a header row or NDJSON, optionally gzip-compressed (.gz or gzip magic).
Fields are Paigo's record fields: id, customerId, dimensionId, recordValue, timestamp
(RFC 3339), metadata (a JSON object; in CSV also metadata.KEY columns). NDJSON is chosen for
.ndjson/.jsonl/.json files and files whose first character is '{{'; CSV otherwise.

Record ids: a record's own `id` is used as is. A record without one gets a stable id derived
from the file's name, its line number and the line's text (import-<hash>), so re-sending a line
counts once; renaming the file or inserting lines above changes the derived ids.

Resuming: after each acknowledged batch FILE{CHECKPOINT_SUFFIX} records the last line. Run the
same command again after an interruption and it continues from there (--restart ignores it).

Rejected lines are written to FILE{REJECTED_SUFFIX}: one JSON object per line with the line
number, the record, the field, the reason and the error.

History older than the gateway's ingest.late_arrival_limit (default 35d) is rejected as
too_late: raise it on the gateway (e.g. to 400d) for a backfill of older data. Ids are
remembered for ingest.dedup_window (default 35d) from when the gateway first received them, so
importing the same file again within that window counts nothing twice.

The API key (ingest scope) is read from ${KEY_ENV} (see --api-key-env).
Exit codes: 0 every line processed (see the summary for rejections), 1 the gateway refused or
could not be reached (resume later), 2 bad arguments or file, 130 interrupted (resumable)."""


class ImportFailed(Exception):
    """The import cannot go on (refused key, unreachable gateway, a batch the gateway refuses
    as a whole); the checkpoint holds what was acknowledged."""


# --- reading the file --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One record of the file: ``record`` is None when the line could not be read as one."""

    number: int  # 1-based line where the record starts
    text: str  # the line as read (a CSV row re-joined), for the rejected summary and the id
    record: dict[str, Any] | None
    error: str | None = None


def is_gzip(path: Path) -> bool:
    if path.suffix == ".gz":
        return True
    with path.open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_text(path: Path) -> IO[str]:
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def file_format(path: Path) -> str:
    """``ndjson`` or ``csv``: by extension (under .gz), else by the first character."""
    name = path.name.removesuffix(".gz")
    if name.endswith((".ndjson", ".jsonl", ".json")):
        return "ndjson"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    with open_text(path) as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return "ndjson" if head.startswith("{") else "csv"


def read_lines(path: Path) -> Iterator[Line]:
    if file_format(path) == "ndjson":
        yield from _ndjson(path)
    else:
        yield from _csv(path)


def _ndjson(path: Path) -> Iterator[Line]:
    with open_text(path) as f:
        for number, raw in enumerate(f, start=1):
            text = raw.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                yield Line(number, text, None, f"not JSON: {exc}")
                continue
            if not isinstance(value, dict):
                yield Line(number, text, None, "expected a JSON object (one record per line)")
                continue
            yield Line(number, text, value)


def _csv(path: Path) -> Iterator[Line]:
    with open_text(path) as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        last = 0
        for row in reader:
            number, last = last + 1, reader.line_num
            if header is None:
                header = [h.strip().lstrip("\ufeff") for h in row]
                continue
            if not any(cell.strip() for cell in row):
                continue
            text = _csv_text(row)
            if len(row) != len(header):
                yield Line(number, text, None, f"{len(row)} columns, the header has {len(header)}")
                continue
            try:
                yield Line(number, text, csv_record(header, row))
            except ValueError as exc:
                yield Line(number, text, None, str(exc))


def _csv_text(row: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(row)
    return out.getvalue()


def csv_record(header: list[str], row: list[str]) -> dict[str, Any]:
    """A CSV row → a record: empty cells are absent, ``metadata`` is a JSON object,
    ``metadata.KEY`` columns are metadata keys (text)."""
    record: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for name, cell in zip(header, row, strict=True):
        if cell == "":
            continue
        if name == "metadata":
            try:
                value = orjson.loads(cell)
            except orjson.JSONDecodeError:
                raise ValueError("metadata is not a JSON object") from None
            if not isinstance(value, dict):
                raise ValueError("metadata is not a JSON object")
            metadata.update(value)
        elif name.startswith(_METADATA_PREFIX):
            metadata[name[len(_METADATA_PREFIX) :]] = cell
        else:
            record[name] = cell
    if metadata:
        record["metadata"] = metadata
    return record


def derived_id(file_name: str, line: int, text: str) -> str:
    """The id of a record without one: stable for the same line of the same-named file."""
    digest = hashlib.blake2b(
        f"{file_name}\x00{line}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16
    )
    return f"import-{digest.hexdigest()}"


def with_id(line: Line, file_name: str) -> dict[str, Any]:
    assert line.record is not None
    rid = line.record.get("id")
    if rid is None or rid == "":
        return {**line.record, "id": derived_id(file_name, line.number, line.text)}
    return line.record


# --- checkpoint --------------------------------------------------------------------------------


@dataclass(slots=True)
class Checkpoint:
    """What was acknowledged so far; ``file`` identifies the input it belongs to."""

    file: str
    line: int = 0
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejected_bytes: int = 0
    complete: bool = False

    @staticmethod
    def load(path: Path) -> Checkpoint | None:
        try:
            return Checkpoint(**orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError, TypeError):
            return None

    def save(self, path: Path) -> None:
        """Written whole to a temporary file and renamed: never half a checkpoint."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(orjson.dumps(asdict(self)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


# --- sending -----------------------------------------------------------------------------------


def retry_after_s(response: httpx.Response, fallback: float) -> float:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), else ``fallback``."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return fallback
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return fallback
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts over the whole file (every run of it); ``sent`` and ``seconds`` are this run's."""

    records: int
    accepted: int
    duplicates: int
    rejected: int
    sent: int
    seconds: float
    resumed_from: int  # the line this run continued after (0: from the start)
    already_complete: bool = False

    @property
    def rate(self) -> float:
        return 0.0 if self.seconds <= 0 else self.sent / self.seconds


class Importer:
    """Sends one file's records in batches; see the module docstring."""

    def __init__(
        self,
        path: Path,
        client: httpx.Client,
        batch_size: int = DEFAULT_BATCH,
        *,
        restart: bool = False,
        progress: bool | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.checkpoint_path = path.with_name(path.name + CHECKPOINT_SUFFIX)
        self.rejected_path = path.with_name(path.name + REJECTED_SUFFIX)
        self._client = client
        self._batch = batch_size
        self._restart = restart
        self._progress = progress
        self._sleep = sleep
        self._monotonic = monotonic

    def run(self) -> Summary:
        from tqdm import tqdm

        ident = fingerprint(self.path)
        cp = None if self._restart else Checkpoint.load(self.checkpoint_path)
        if cp is not None and cp.file != ident:
            print(
                f"{self.checkpoint_path.name} belongs to another version of the file; "
                "starting from the first line (records already sent count as duplicates)",
                file=sys.stderr,
            )
            cp = None
        if cp is None:
            cp = Checkpoint(ident)
            self.rejected_path.unlink(missing_ok=True)
        resumed_from = cp.line
        started = self._monotonic()
        start_records = cp.records
        if cp.complete:
            return Summary(
                cp.records, cp.accepted, cp.duplicates, cp.rejected, 0, 0.0, cp.line, True
            )
        total = self._count() if self._progress is not False else None
        with (
            self.rejected_path.open("ab") as rejected,
            tqdm(
                total=total,
                initial=cp.records,
                unit="rec",
                unit_scale=True,
                disable=None if self._progress is None else not self._progress,
                file=sys.stderr,
                desc=self.path.name,
                dynamic_ncols=True,
            ) as bar,
        ):
            # Lines written past the checkpoint by an import that was stopped belong to a batch
            # that will be sent again.
            rejected.truncate(cp.rejected_bytes)
            bar.set_postfix(rejected=cp.rejected, refresh=False)
            pending: list[Line] = []
            for line in read_lines(self.path):
                if line.number <= cp.line:
                    continue
                pending.append(line)
                if len(pending) >= self._batch:
                    self._send(pending, cp, rejected, bar)
                    pending = []
            if pending:
                self._send(pending, cp, rejected, bar)
        cp.complete = True
        cp.save(self.checkpoint_path)
        return Summary(
            cp.records,
            cp.accepted,
            cp.duplicates,
            cp.rejected,
            cp.records - start_records,
            self._monotonic() - started,
            resumed_from,
        )

    def _count(self) -> int:
        return sum(1 for _ in read_lines(self.path))

    def _send(self, lines: list[Line], cp: Checkpoint, rejected: IO[bytes], bar: Any) -> None:
        sendable = [ln for ln in lines if ln.record is not None]
        out: list[dict[str, Any]] = []
        for ln in lines:
            if ln.record is None:
                out.append(_rejected_line(ln, None, "malformed", ln.error or "unreadable"))
        body: dict[str, Any] = {"accepted": 0, "duplicates": 0, "errors": []}
        if sendable:
            body = self._post([with_id(ln, self.path.name) for ln in sendable])
        for err in body.get("errors") or ():
            idx = err.get("index")
            if isinstance(idx, int) and 0 <= idx < len(sendable):
                ln = sendable[idx]
                out.append(
                    _rejected_line(ln, err.get("field"), err.get("reason"), err.get("error"))
                )
        out.sort(key=lambda r: int(r["line"]))
        if out:
            rejected.write(b"".join(orjson.dumps(r) + b"\n" for r in out))
            rejected.flush()
            os.fsync(rejected.fileno())
        cp.line = lines[-1].number
        cp.records += len(lines)
        cp.accepted += int(body.get("accepted", 0))
        cp.duplicates += int(body.get("duplicates", 0))
        cp.rejected += len(out)
        cp.rejected_bytes = rejected.tell()
        cp.save(self.checkpoint_path)
        bar.set_postfix(rejected=cp.rejected, refresh=False)
        bar.update(len(lines))

    def _post(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        payload = gzip.compress(orjson.dumps(records), compresslevel=1)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        backoff = 0.5
        unreachable_since: float | None = None
        while True:
            try:
                r = self._client.post("/v1/usage", content=payload, headers=headers)
            except httpx.TransportError as exc:
                now = self._monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > UNREACHABLE_GIVE_UP_S:
                    raise ImportFailed(f"cannot reach the gateway: {exc}") from exc
                self._sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            unreachable_since = None
            if r.status_code in RETRY_STATUSES:
                self._sleep(retry_after_s(r, backoff))
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            if r.status_code == 413:
                raise ImportFailed(
                    f"the gateway refused a batch of {len(records)} records as too large "
                    f"(HTTP 413): try a smaller --batch. {r.text[:300]}"
                )
            if r.status_code >= 300:
                raise ImportFailed(f"HTTP {r.status_code}: {r.text[:500]}")
            result: dict[str, Any] = r.json()
            return result


def _rejected_line(line: Line, field: Any, reason: Any, error: Any) -> dict[str, Any]:
    return {
        "line": line.number,
        "record": line.record if line.record is not None else line.text,
        "field": field,
        "reason": reason,
        "error": error,
    }


# --- the command -------------------------------------------------------------------------------


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="backfill usage history from a CSV or NDJSON file (via the API)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="CSV (with a header) or NDJSON, .gz allowed")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--url", help="gateway API base URL (default: the config's server.http.listen, else "
        "http://127.0.0.1:8080)",
    )  # fmt: skip
    where.add_argument("--config", metavar="FILE", help="gateway config to take the address from")
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"records per request (default {DEFAULT_BATCH})",
    )
    p.add_argument("--api-key-env", default=KEY_ENV, help=f"variable holding the key ({KEY_ENV})")
    p.add_argument("--restart", action="store_true", help="ignore the checkpoint, start over")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the progress bar (default: when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"meter-gateway import: {path}: no such file", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("meter-gateway import: --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        base = base_url(args.url, args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{args.config}: {line}", file=sys.stderr)
        return 2
    key = os.environ.get(args.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        importer = Importer(path, client, args.batch, restart=args.restart, progress=args.progress)
        try:
            s = importer.run()
        except ImportFailed as exc:
            print(
                f"meter-gateway import: {exc}\n(acknowledged lines are in "
                f"{importer.checkpoint_path.name}; run the command again to resume)",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            print(
                "\nmeter-gateway import: interrupted; run the command again to resume",
                file=sys.stderr,
            )
            return 130
    if s.already_complete:
        print(
            f"{path.name}: already imported ({s.records} records; accepted {s.accepted}, "
            f"duplicates {s.duplicates}, rejected {s.rejected}); --restart sends it again"
        )
        return 0
    resumed = f", resumed after line {s.resumed_from}" if s.resumed_from else ""
    print(
        f"{path.name}: {s.records} records; accepted {s.accepted}, duplicates "
        f"{s.duplicates}, rejected {s.rejected}"
        + (f" (listed in {importer.rejected_path.name})" if s.rejected else "")
        + f"; this run sent {s.sent} at {s.rate:,.0f} records/s{resumed}"
    )
    return 0
