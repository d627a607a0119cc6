"""Encryption-key rotation: re-encrypt every stored token under the newest configured key, while the service runs.

Run with `TOKENSVC_ENCRYPTION_KEYS="new,old"` (the service's replicas configured the same way first, so that they
read rows under either key). Rows go in batches of one short transaction each: lock the batch (skipping rows an
in-flight refresh holds), decrypt each ciphertext with whichever configured key it names, encrypt it with the newest,
write it back under the lock, commit. Rows skipped because they were locked are taken on a later pass. A row no
configured key can read is left untouched and reported by user id (never by ciphertext). Revocation tombstones
(deleted users' grants waiting for Strava) go the same way after the rows, each write fenced by the ciphertext it
replaces (an attempt that refreshed the grant meanwhile wins; the next pass takes its new pair).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.crypto import DecryptionError, Field, TokenCipher
from tokensvc.store import keys as store
from tokensvc.store import tombstones
from tokensvc.store.keys import SealedRow
from tokensvc.store.tombstones import SealedTombstone

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BatchDone:
    """One committed batch: rows re-encrypted in it, and in the whole run so far."""

    reencrypted: int
    total: int


@dataclass(slots=True)
class RotationReport:
    """What a run did. `unreadable` maps user id to the field no configured key could decrypt; `still_locked`
    counts rows that stayed locked by refreshes until the run gave up on them (run again)."""

    key_id: str
    reencrypted: int = 0
    unreadable: dict[str, Field] = field(default_factory=dict)
    still_locked: int = 0
    passes: int = 0
    unreadable_tombstones: set[int] = field(default_factory=set)  # also named in `unreadable`

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.still_locked

    def count_batch(self, written: int, on_batch: Callable[[BatchDone], None] | None) -> None:
        """Add the rows a committed batch re-encrypted, and tell `on_batch` (the CLI's progress line)."""
        self.reencrypted += written
        if on_batch is not None:
            on_batch(BatchDone(reencrypted=written, total=self.reencrypted))


class KeyRotator:
    """Moves every row to the cipher's current key. Each batch is its own transaction; nothing else is held."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        cipher: TokenCipher,
        batch_size: int = 500,
        locked_wait_seconds: float = 60.0,
        retry_delay_seconds: float = 0.2,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._engine = engine
        self._cipher = cipher
        self._batch_size = batch_size
        self._locked_wait = locked_wait_seconds
        self._retry_delay = retry_delay_seconds

    async def rotate(self, *, on_batch: Callable[[BatchDone], None] | None = None) -> RotationReport:
        """Re-encrypt every row not fully under the current key; idempotent (a second run finds nothing to do).

        Passes over the table until no row is left but unreadable ones, waiting (up to `locked_wait_seconds`) for
        rows that in-flight refreshes kept locked. Raises only what the database raises.
        """
        report = RotationReport(key_id=self._cipher.current_key_id)
        give_up_at = time.monotonic() + self._locked_wait
        delay = self._retry_delay
        while True:
            report.passes += 1
            await self._one_pass(report, on_batch)
            await self._tombstone_pass(report, on_batch)
            left = await self._left_over(report)
            if not left:
                break
            if time.monotonic() >= give_up_at:
                report.still_locked = left
                log.warning("key_rotation.gave_up_on_locked_rows", rows=left, passes=report.passes)
                break
            log.info("key_rotation.waiting_for_locked_rows", rows=left, passes=report.passes)
            await asyncio.sleep(delay)  # a backoff for rows held by refreshes in flight, not a synchronisation
            delay = min(delay * 2, 2.0)
        log.info(
            "key_rotation.finished",
            key_id=report.key_id,
            reencrypted=report.reencrypted,
            unreadable=len(report.unreadable),
            still_locked=report.still_locked,
            passes=report.passes,
        )
        return report

    async def _one_pass(self, report: RotationReport, on_batch: Callable[[BatchDone], None] | None) -> None:
        after = ""
        current = self._cipher.current_key_id
        while True:
            written = 0
            async with self._engine.begin() as conn:
                rows = await store.lock_batch(conn, current_key_id=current, after=after, limit=self._batch_size)
                for row in rows:
                    sealed = self._reseal(row, report)
                    if sealed is None:
                        continue
                    access, refresh = sealed
                    if await store.write_sealed(
                        conn, row, access_token_enc=access, refresh_token_enc=refresh, key_id=current
                    ):
                        written += 1
            if not rows:
                return
            report.count_batch(written, on_batch)
            after = rows[-1].user_id
            if len(rows) < self._batch_size:  # skipped (locked) rows do not count towards the limit: this was the end
                return

    async def _tombstone_pass(self, report: RotationReport, on_batch: Callable[[BatchDone], None] | None) -> None:
        after = 0
        current = self._cipher.current_key_id
        while True:
            written = 0
            async with self._engine.begin() as conn:
                batch = await tombstones.needing_rotation(
                    conn, current_key_id=current, after=after, limit=self._batch_size
                )
                for old in batch:
                    sealed = self._reseal_tombstone(old, report)
                    if sealed is not None and await tombstones.write_sealed(
                        conn, old, refresh_token_enc=sealed[0], access_token_enc=sealed[1], key_id=current
                    ):
                        written += 1
            if not batch:
                return
            report.count_batch(written, on_batch)
            after = batch[-1].id

    def _reseal_tombstone(self, old: SealedTombstone, report: RotationReport) -> tuple[str, str | None] | None:
        """Its ciphertexts under the current key (bound to the user id, as in the row they came from), or None
        (and reported as `<user id> (tombstone <id>)`) when one cannot be read."""
        fields: tuple[tuple[Field, str | None], ...] = (
            ("refresh", old.refresh_token_enc),
            ("access", old.access_token_enc),
        )
        label = _tombstone_label(old.id, old.user_id)
        sealed = self._reseal_fields(old.user_id, fields, report, label=label, tombstone_id=old.id)
        if sealed is None:
            report.unreadable_tombstones.add(old.id)
            return None
        return sealed["refresh"] or "", sealed["access"]

    def _reseal(self, row: SealedRow, report: RotationReport) -> tuple[str | None, str | None] | None:
        """Both ciphertexts under the current key, or None (and the user reported) when one cannot be read."""
        fields: tuple[tuple[Field, str | None], ...] = (
            ("access", row.access_token_enc),
            ("refresh", row.refresh_token_enc),
        )
        sealed = self._reseal_fields(row.user_id, fields, report, label=row.user_id, user_id=row.user_id)
        return None if sealed is None else (sealed["access"], sealed["refresh"])

    def _reseal_fields(
        self,
        bound_to: str,
        fields: tuple[tuple[Field, str | None], ...],
        report: RotationReport,
        *,
        label: str,
        **where: object,
    ) -> dict[Field, str | None] | None:
        """Each ciphertext decrypted and encrypted again under the current key, bound to the user id `bound_to` (an
        absent one stays absent), in the order given; None when one cannot be read: `label` is then reported
        unreadable (logged once, with `where` saying which row)."""
        sealed: dict[Field, str | None] = {}
        for field_name, ciphertext in fields:
            if ciphertext is None:
                sealed[field_name] = None
                continue
            try:
                plaintext = self._cipher.decrypt(ciphertext, user_id=bound_to, field=field_name)
            except DecryptionError as exc:
                if label not in report.unreadable:
                    log.error("token.decrypt_failed", **where, field=field_name, error=str(exc))
                report.unreadable[label] = field_name
                return None
            sealed[field_name] = self._cipher.encrypt(plaintext, user_id=bound_to, field=field_name)
        return sealed

    async def _left_over(self, report: RotationReport) -> int:
        """Rows still needing rotation that are not known to be unreadable (that is: rows that were locked)."""
        async with self._engine.connect() as conn:
            limit = len(report.unreadable) + self._batch_size
            ids = await store.pending(conn, current_key_id=self._cipher.current_key_id, limit=limit)
            buried = await tombstones.pending_rotation(conn, current_key_id=self._cipher.current_key_id, limit=limit)
        rows = sum(1 for user_id in ids if user_id not in report.unreadable)
        return rows + sum(1 for tombstone_id in buried if tombstone_id not in report.unreadable_tombstones)


def _tombstone_label(tombstone_id: int, user_id: str) -> str:
    return f"{user_id} (tombstone {tombstone_id})"
