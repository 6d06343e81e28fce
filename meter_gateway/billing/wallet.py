"""Prepaid credits: a customer's wallet per currency, as an append-only ledger of exact amounts.

Top-ups add to it; a finalized invoice draws ``min(balance, total)`` from it (in the same store
transaction as the finalization, see ``invoices``). Entries are numbered per wallet, and the
store refuses an entry whose number is taken, so two replicas never both spend one balance:
the loser re-reads and retries. A top-up may carry an id: sending it again changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.pricing import minor_unit, round_money
from meter_gateway.store.base import BillingStore, ConflictError, LedgerEntry

RETRIES = 20


class WalletError(ValueError):
    """A top-up that cannot be applied; the message says why."""


@dataclass(frozen=True, slots=True)
class TopUp:
    entry: LedgerEntry
    created: bool  # False: the same top-up id was already applied (this is that entry)


def balance(store: BillingStore, customer: str, currency: str) -> tuple[Decimal, int]:
    """(balance, seq of the latest entry) of a wallet; an empty wallet is (0, 0)."""
    last = store.wallet_last(customer, currency)
    return (ZERO, 0) if last is None else (last.balance, last.seq)


def top_up(
    store: BillingStore,
    customer: str,
    currency: str,
    amount: Decimal,
    now_ns: int,
    top_up_id: str | None = None,
    note: str | None = None,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> TopUp:
    """Add ``amount`` (> 0, in whole minor units of ``currency``) to the wallet."""
    try:
        minor_unit(currency)
    except ValueError as exc:
        raise WalletError(str(exc)) from None
    if not amount.is_finite() or amount <= 0:
        raise WalletError(f"amount must be a positive decimal, got {amount}")
    money = round_money(amount, currency)  # same value, written with the minor unit's places
    if money != amount:
        raise WalletError(
            f"amount {amount} has more decimal places than {currency} has ({minor_unit(currency)})"
        )
    amount = money
    entry_id = f"top_up:{top_up_id or new_id()}"
    for _ in range(RETRIES):
        current, seq = balance(store, customer, currency)
        entry = LedgerEntry(
            customer,
            currency,
            seq + 1,
            entry_id,
            "top_up",
            amount,
            EXACT.add(current, amount),
            now_ns,
            note,
        )
        try:
            if store.wallet_append([entry]):
                return TopUp(entry, True)
        except ConflictError:
            continue  # another entry landed first: re-read the balance
        for e in store.wallet_entries(customer, currency, 0, 1_000_000):
            if e.entry_id == entry_id:
                return TopUp(e, False)
        raise ConflictError(f"top-up {entry_id!r} is neither new nor found")  # pragma: no cover
    raise ConflictError(f"wallet {customer}/{currency} kept changing; try again")


def entry_json(e: LedgerEntry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "id": e.entry_id,
        "kind": e.kind,
        "currency": e.currency,
        "amount": str(e.amount),
        "balance": str(e.balance),
        "createdAt": format_timestamp(e.created_ns),
        "reference": e.reference,
    }
