"""The hash chain: the stored record text, row hashes and the verification walk.

Each stored event carries ``seq`` (1, 2, 3 ... with no gaps), ``prev_hash`` (the previous row's
hash; 64 zeros for the first row ever) and ``hash = SHA-256(prev_hash || data)`` where ``data`` is
the record's JSON text exactly as stored: no whitespace, ``seq`` first, then the event's fields
(a request event's in their fixed order, other events' sorted by name). The hash covers the stored
text itself, so verification never re-serialises a record. Editing a row changes its hash;
deleting a row leaves a gap in ``seq``; inserting a row breaks the next row's ``prev_hash``. A
retention purge deletes the oldest rows and records an ``audit.purged`` event carrying the anchor
(seq and hash of the last deleted row), so the walk can start after it.

With a chain key (``audit.chain_key``, a secret kept out of the database) a row's hash is
``HMAC-SHA-256(key, prev_hash || data)`` instead: someone who can write the table but does not
hold the key cannot compute a valid hash for an edited, inserted or forged row, nor re-chain the
rows after one. Rows written before the key was set keep their plain hashes; verify with keys
accepts them only before the first signed row, which must be the ``audit.chain_key`` event that
introduced the key, so a signed chain cannot be passed off as an unsigned one, nor signed rows
appended to a forged unsigned history. Any configured key is accepted for any signed row (the
current one first, then older ones: a rotation, rolled out one instance at a time).
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from gateway.fastjson import dumps, utf8_safe

GENESIS = "0" * 64
#: Columns copied out of the hashed record for filtering; verify checks they still agree with it.
INDEXED = ("time", "type", "request_id", "key_id", "owner", "client_ip", "status")


def record_body(event: dict[str, Any], sort: bool = False) -> str:
    """The event's fields as JSON without the opening brace (``record_text`` puts ``seq`` first)."""
    if "seq" in event:
        event = {k: v for k, v in event.items() if k != "seq"}
    return dumps(event, sort_keys=sort, default=str)[1:]


def record_text(seq: int, body: str) -> str:
    """The stored (and hashed) record: ``{"seq":N,`` followed by ``record_body``."""
    return f'{{"seq":{seq},{body}' if body != "}" else f'{{"seq":{seq}}}'


def canonical(event: dict[str, Any]) -> str:
    """The record text for an event that already carries its ``seq``."""
    ev = dict(event)
    seq = ev.pop("seq")
    return record_text(seq, record_body(ev, sort=True))


def row_hash(prev_hash: str, data: str, key: bytes | None = None) -> str:
    msg = (prev_hash + data).encode("utf-8")
    return hmac.digest(key, msg, "sha256").hex() if key else hashlib.sha256(msg).hexdigest()


class ChainKeys:
    """The chain keys in force (shared by the database sink's writer, verify and the admin API, and
    replaced by a reload): ``keys[0]`` signs new rows, all of them are accepted by verify, newest
    first. Empty: plain SHA-256."""

    def __init__(self, keys: tuple[bytes, ...] = ()) -> None:
        self.keys = keys
        #: this process saw the trail signed (read a signed newest row, or wrote one): from then on
        #: an unsigned newest row is a replaced history, never a first key (store._append)
        self.seen_signed = False
        #: (seq, hash) of the newest row this process wrote, and the last one it logged (sinks.DatabaseSink)
        self.head: tuple[int, str] | None = None
        self.head_logged: tuple[int, str] | None = None
        self.next_head_log = 0.0

    @classmethod
    def of(cls, config: Any) -> "ChainKeys":
        current = getattr(config, "chain_key", "") or ""
        return cls(tuple(k.encode("utf-8") for k in ([current] + list(config.previous_chain_keys) if current else [])))


def chain_keys(services: Any) -> ChainKeys:
    """The process's chain keys (one chain per database; kept across reloads)."""
    return services.resource("audit:chain-keys", ChainKeys)


def key_id(key: bytes) -> str:
    """A chain key's public name in events and reports (it tells keys apart, reveals nothing)."""
    return hmac.digest(key, b"gateway audit chain key id", "sha256").hex()[:16]


def signer(prev_hash: str, data: str, h: str, keys: tuple[bytes, ...]) -> int | None:
    """Which key made ``h``: its index in ``keys``, ``len(keys)`` for a plain SHA-256 hash, None
    for neither (the row was edited, or signed with a key not given)."""
    for i, k in enumerate(keys):
        if hmac.compare_digest(row_hash(prev_hash, data, k), h):
            return i
    return len(keys) if row_hash(prev_hash, data) == h else None


#: The event that introduces a chain key (see the audit plugin's activated()).
KEY_EVENT = "audit.chain_key"


@dataclass
class VerifyResult:
    ok: bool = True
    rows: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    anchor: dict[str, Any] | None = None
    broken: dict[str, Any] | None = None
    #: With chain keys: the first row signed with one (None: none is), and what signed the newest row
    #: ("current", "previous", "none"); without keys both stay None.
    signed_from: int | None = None
    head_signed: str | None = None
    #: Heads recorded earlier that were checked (``--head``): {"seq", "hash", "result": "found" |
    #: "anchor" (deleted by the latest purge, its hash kept by the purge's anchor) | "purged"}
    heads: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "head_hash": self.head_hash, "anchor": self.anchor, "broken": self.broken,
                "signed_from": self.signed_from, "head_signed": self.head_signed, "heads": self.heads}

    def message(self) -> str:
        if self.ok:
            if not self.rows:
                return "audit chain intact: no events stored"
            s = f"audit chain intact: {self.rows} events, seq {self.first_seq}..{self.last_seq}, head {self.head_hash}"
            if self.anchor:
                s += f" (starts after purge anchor seq {self.anchor['seq']})"
            if self.head_signed is not None:
                s += (f"; signed with the chain key from seq {self.signed_from}" if self.signed_from is not None
                      and self.signed_from != self.first_seq else "; every row signed with the chain key")
            found = [str(h["seq"]) for h in self.heads if h["result"] == "found"]
            anchor = [str(h["seq"]) for h in self.heads if h["result"] == "anchor"]
            purged = [str(h["seq"]) for h in self.heads if h["result"] == "purged"]
            if found:
                s += f"; recorded head(s) at seq {', '.join(found)} found with their hashes"
            if anchor:
                s += f"; recorded head at seq {anchor[0]} deleted by retention, its hash kept by the purge's anchor"
            if purged:
                s += f"; recorded head(s) at seq {', '.join(purged)} deleted by retention (not comparable)"
            return s
        assert self.broken is not None
        return f"audit chain BROKEN at seq {self.broken['seq']} ({self.broken['problem']}): {self.broken['detail']}"


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:HASH``, a head recorded earlier (``verify``'s report, the gateway's ``audit head`` log
    line) -> (seq, hash). ValueError with a message saying what is wrong."""
    seq, sep, h = text[:200].partition(":")
    seq = seq.strip()
    if not sep or not seq.isascii() or not seq.isdigit() or len(seq) > 18 or int(seq) < 1:
        raise ValueError(f"a recorded head is SEQ:HASH (seq 1 or more, at most 18 digits), not {text[:80]!r}")
    h = h.strip().lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"the hash of a recorded head is 64 hex digits, not {h[:80]!r}")
    return int(seq), h


def check_heads(res: VerifyResult, heads: list[tuple[int, str]], stored: dict[int, str]) -> VerifyResult:
    """After a walk that verified (``res``), the heads recorded earlier: each must still be in the
    trail with the same hash (``stored``: the hashes of the rows at those seqs), or be before the
    anchor of a retention purge. The chain alone cannot tell that its newest rows were removed (what
    remains links up), nor a history replaced as a whole by someone with the key: a head recorded
    outside the database can."""
    for seq, h in heads:
        if res.last_seq is None or seq > res.last_seq:
            ends = f"ends at seq {res.last_seq}" if res.last_seq is not None else "is empty"
            return _fail(res, seq, "truncated", f"the trail {ends}, before the head recorded at seq {seq}: "
                         "rows were removed from its end (or the trail was replaced)")
        if res.first_seq is not None and seq >= res.first_seq:
            now, result = stored.get(seq), "found"
        elif res.anchor is not None and seq == res.anchor["seq"]:
            # deleted by the latest purge, whose event keeps its hash: compared (the row is gone)
            now, result = res.anchor["hash"], "anchor"
        else:  # before the purge anchor (the walk checked that one accounts for every row before it)
            res.heads.append({"seq": seq, "hash": h, "result": "purged"})
            continue
        if now != h:
            return _fail(res, seq, "replaced", f"the row at seq {seq} does not have the hash recorded for it "
                         f"({h[:16]}...): the trail was rewritten or replaced from there")
        res.heads.append({"seq": seq, "hash": h, "result": result})
    return res


def _fail(res: VerifyResult, seq: int, problem: str, detail: str) -> VerifyResult:
    res.ok = False
    res.broken = {"seq": seq, "problem": problem, "detail": detail}
    return res


async def verify_rows(rows: AsyncIterator[Any], anchor: dict[str, Any] | None,
                      keys: tuple[bytes, ...] = (), whole: bool = True, signed_before: bool = False) -> VerifyResult:
    """Walk rows (objects with seq, prev_hash, hash, data and the indexed columns) in seq order.

    ``anchor`` is the ``{"seq", "hash"}`` recorded by the latest ``audit.purged`` event, if any.
    ``keys``: the chain keys, current first (see the module's docstring); with keys, the newest row
    must be signed with one of them, unless the rows are not the ``whole`` trail (a purge checking
    the oldest rows it is about to delete). ``signed_before``: the anchor's purge was signed (so
    were the rows it deleted): the rows after it must be signed too."""
    res = VerifyResult()
    prev_seq: int | None = None
    prev_hash: str | None = None
    unsigned = len(keys)
    prev_rank = 0 if signed_before and keys else unsigned  # unsigned rows may only come first
    async for r in rows:
        seq = int(r.seq)
        if prev_seq is None:
            res.first_seq = seq
            if seq == 1:
                if r.prev_hash != GENESIS:
                    return _fail(res, seq, "inserted",
                                 "the first row does not start the chain (prev_hash is not the genesis value)")
            elif anchor is None:
                return _fail(res, seq, "deleted",
                             f"rows 1..{seq - 1} are missing and no audit.purged event accounts for them")
            elif int(anchor.get("seq", -1)) != seq - 1 or anchor.get("hash") != r.prev_hash:
                return _fail(res, seq, "deleted",
                             f"the first row does not follow the purge anchor (anchor seq {anchor.get('seq')}): "
                             "rows were deleted or the first row was replaced")
            else:
                res.anchor = {"seq": int(anchor["seq"]), "hash": anchor["hash"]}
        else:
            if seq != prev_seq + 1:
                missing = f"seq {prev_seq + 1}" if seq == prev_seq + 2 else f"seq {prev_seq + 1}..{seq - 1}"
                return _fail(res, seq, "deleted", f"{missing} missing after seq {prev_seq}")
            if r.prev_hash != prev_hash:
                return _fail(res, seq, "inserted",
                             f"prev_hash does not match the hash of seq {prev_seq}: "
                             "a row was inserted or replaced before this one")
        rank = signer(r.prev_hash, r.data, r.hash, keys)
        if rank is None:
            return _fail(res, seq, "edited", "the stored record does not match its hash (the row was edited)" + (
                ", or it was signed with a key missing from chain_key / previous_chain_keys" if keys else
                ", or it was signed with a chain key and none is configured (audit.chain_key)"))
        if rank == unsigned and prev_rank < unsigned:
            return _fail(res, seq, "edited", "the row is not signed with a chain key, after signed rows: it was "
                         "rewritten or added by someone without the key")
        try:
            data = json.loads(r.data)
        except ValueError:
            return _fail(res, seq, "edited", "the stored record is not valid JSON")
        if rank < unsigned and prev_rank == unsigned:
            # The first signed row. Unless the walk starts with it after a purge (the purge's signed
            # event vouches for what came before), it is the event that introduced the key: a signed
            # row on top of unsigned ones is a gateway with a key writing on a history someone
            # replaced.
            if (prev_seq is not None or anchor is None or seq == 1) and data.get("type") != KEY_EVENT:
                return _fail(res, seq, "inserted", f"the first signed row is not the {KEY_EVENT} event that "
                             "introduced the key: the unsigned rows before it were replaced")
            res.signed_from = seq
        if data.get("seq") != seq:
            return _fail(res, seq, "edited", "the seq column differs from the hashed record")
        for col in INDEXED:
            if getattr(r, col) != _col_value(col, data.get(col)):
                return _fail(res, seq, "edited", f"column {col!r} differs from the hashed record")
        prev_seq, prev_hash, prev_rank = seq, r.hash, rank
        res.rows += 1
    res.last_seq = prev_seq
    res.head_hash = prev_hash
    if keys and prev_seq is not None and whole:
        res.head_signed = "current" if prev_rank == 0 else ("none" if prev_rank == len(keys) else "previous")
        if prev_rank == len(keys):
            return _fail(res, prev_seq, "edited",
                         "the newest row is not signed with the chain key: the signed rows after it were deleted "
                         "or rewritten without the key (or no gateway has run with chain_key yet: one writes "
                         "an audit.chain_key event when it starts)")
    return res


def _col_value(col: str, v: Any) -> Any:
    """How a record field is stored in its indexed column (see store.row_values)."""
    if v is None:
        return None
    if col == "status":
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None
    return utf8_safe(str(v)[:_COL_LEN[col]])


_COL_LEN = {"time": 32, "type": 64, "request_id": 128, "key_id": 128, "owner": 256, "client_ip": 64}
