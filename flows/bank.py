"""Example batch type ``bank/txn`` (ported from Alya's bank example): deposits and withdrawals on accounts.

Each row is ``{"account": "acct-0001", "kind": "deposit" | "withdraw", "amount": 125, "txn": "<id>"}``
(amounts in cents, ``txn`` optional). The processor applies it in one database transaction on the table
``bank_accounts`` (created if missing, in the alya database); a withdrawal that would take the balance
below zero fails with an ``ErrorMessage(errcode="insufficient_funds")``. A row carrying a ``txn`` id is
applied at most once even if a worker dies after its commit and the row is run again: the outcome is
recorded in ``bank_txns`` in the same transaction and replayed.
Every row writes one line to the output file ``ledger.csv``.

File intake: the file type ``txn`` (:class:`TxnFileChecker`) turns a CSV of transactions (columns account,
kind, amount, txn) dropped in the intake folder into a bank/txn batch (``flows/intake.py``).

``make_transactions`` generates N transactions whose outcome does not depend on the order rows are
processed in (opening balances cover every ordinary withdrawal; deliberate overdrafts exceed anything an
account can ever hold), and ``expected_balances`` computes the final balances from the input.

Run the demo: ``python -m flows.bank 100000 --batches 10`` (needs ALYA_DATABASE_URL).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from alya import BatchJobResult, BatchStatus, ErrorMessage, FileCheck, IncomingFile, JobManager, batch_flow
from alya.io.readers import column_summary
from flows.common import DbBlock, LoggingDone, example_jobmanager, first_registration

APP, OP = "bank", "txn"
OVERDRAFT = 10**12  # more than any account here can hold: such a withdrawal always fails

SCHEMA = """
SELECT pg_advisory_xact_lock(hashtext('alya_example_bank_schema'));
CREATE TABLE IF NOT EXISTS bank_accounts (
    account text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS bank_txns (
    txn text PRIMARY KEY,
    account text NOT NULL,
    ok boolean NOT NULL,
    balance bigint NOT NULL
);
"""


# The bulk processor's one statement for many transactions: each applied in order exactly as _APPLY does
# (a transaction already recorded replays its outcome), the accounts locked first in one order, so that two
# calls on overlapping accounts queue instead of deadlocking.
APPLY_MANY = """
CREATE OR REPLACE FUNCTION bank_apply_many(txns jsonb) RETURNS TABLE (o_i int, o_ok boolean, o_balance bigint)
LANGUAGE plpgsql AS $$
DECLARE t jsonb; n int := 0; b bigint; good boolean;
BEGIN
    PERFORM 1 FROM bank_accounts a
    WHERE a.account IN (SELECT DISTINCT x->>'account' FROM jsonb_array_elements(txns) x)
    ORDER BY a.account FOR UPDATE;
    FOR t IN SELECT x FROM jsonb_array_elements(txns) x LOOP
        n := n + 1;
        SELECT r.ok, r.balance INTO good, b FROM bank_txns r WHERE r.txn = t->>'txn';
        IF NOT FOUND THEN
            IF t->>'kind' = 'deposit' THEN
                INSERT INTO bank_accounts AS a (account, balance) VALUES (t->>'account', (t->>'amount')::bigint)
                ON CONFLICT (account) DO UPDATE SET balance = a.balance + excluded.balance
                RETURNING a.balance INTO b;
                good := true;
            ELSE
                UPDATE bank_accounts a SET balance = a.balance - (t->>'amount')::bigint
                WHERE a.account = t->>'account' AND a.balance >= (t->>'amount')::bigint
                RETURNING a.balance INTO b;
                good := FOUND;
                IF NOT good THEN
                    b := coalesce((SELECT a.balance FROM bank_accounts a WHERE a.account = t->>'account'), 0);
                END IF;
            END IF;
            INSERT INTO bank_txns (txn, account, ok, balance) VALUES (t->>'txn', t->>'account', good, b);
        END IF;
        o_i := n; o_ok := good; o_balance := b;
        RETURN NEXT;
    END LOOP;
END $$
"""


def ensure_schema(engine: Engine) -> None:
    """Create the example's tables if missing (serialised: concurrent CREATE IF NOT EXISTS can collide)."""
    with engine.begin() as conn:
        for stmt in filter(str.strip, SCHEMA.split(";")):
            conn.execute(text(stmt))
        conn.exec_driver_sql(APPLY_MANY)


class BankInitializer:
    """``database_url`` may be a function: registering reads no URL, so importing this module starts
    nothing (without ALYA_DATABASE_URL the URL is the embedded PostgreSQL's, started when first asked)."""

    def __init__(self, database_url: str | Callable[[], str]) -> None:
        self.database_url = database_url

    def init(self, app: str) -> DbBlock:
        block = DbBlock(self.database_url if isinstance(self.database_url, str) else self.database_url())
        ensure_schema(block.engine)
        return block


def _invalid(field: str, value: Any, errcode: str = "invalid") -> BatchJobResult:
    return BatchJobResult(status=BatchStatus.FAILED,
                          messages=[ErrorMessage(msgid=1, errcode=errcode, field=field, vals=[str(value)])])


def _csv_line(*values: Any) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


# One statement per transaction (plus the commit): the account change and the record of the transaction.
# A transaction already recorded changes nothing (NOT EXISTS), and its recorded outcome is replayed; two
# runs of one transaction at the same moment collide on the primary key of bank_txns, and the loser's
# whole statement is undone (the row is then retried by alya and replays the winner's outcome).
_APPLY = {
    "deposit": """
        WITH a AS (
            INSERT INTO bank_accounts (account, balance)
            SELECT :account, :amount WHERE NOT EXISTS (SELECT 1 FROM bank_txns WHERE txn = :txn)
            ON CONFLICT (account) DO UPDATE SET balance = bank_accounts.balance + excluded.balance
            RETURNING balance)
        INSERT INTO bank_txns (txn, account, ok, balance)
        SELECT :txn, :account, true, balance FROM a
        RETURNING ok, balance""",
    "withdraw": """
        WITH a AS (
            UPDATE bank_accounts SET balance = balance - :amount
            WHERE account = :account AND balance >= :amount
              AND NOT EXISTS (SELECT 1 FROM bank_txns WHERE txn = :txn)
            RETURNING balance)
        INSERT INTO bank_txns (txn, account, ok, balance)
        SELECT :txn, :account, EXISTS (SELECT 1 FROM a),
               coalesce((SELECT balance FROM a),
                        (SELECT balance FROM bank_accounts WHERE account = :account), 0)
        WHERE NOT EXISTS (SELECT 1 FROM bank_txns WHERE txn = :txn)
        RETURNING ok, balance""",
}


def _checked(input: dict[str, Any]) -> dict[str, Any] | BatchJobResult:
    """A transaction's parameters, or the business failure of a malformed one."""
    account, kind = input.get("account"), input.get("kind")
    amount, txn = input.get("amount"), input.get("txn")
    if not isinstance(account, str) or not account or len(account) > 64:
        return _invalid("account", account)
    if kind not in ("deposit", "withdraw"):
        return _invalid("kind", kind)
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        return _invalid("amount", amount)
    if txn is not None and not isinstance(txn, str):
        return _invalid("txn", txn)
    return {"account": account, "kind": kind, "amount": amount, "txn": txn or f"anon-{uuid.uuid4()}"}


class BankTxnProcessor(LoggingDone):
    def do_batch_job(self, initblock: DbBlock, context: dict[str, Any], line: int,
                     input: dict[str, Any]) -> BatchJobResult:
        params = _checked(input)
        if isinstance(params, BatchJobResult):
            return params
        with initblock.engine.begin() as conn:
            outcome = conn.execute(text(_APPLY[params["kind"]]), params).first()
            if outcome is None:  # applied before (a worker died after committing): the same outcome again
                outcome = conn.execute(text("SELECT ok, balance FROM bank_txns WHERE txn = :txn"), params).one()
        return _result(line, input, bool(outcome[0]), int(outcome[1]))


class BankTxnBulkProcessor(BankTxnProcessor):
    """The same transactions, up to ALYA_BULK_ROWS per call in one statement (``bank_apply_many``) and one
    commit instead of one each: ``python -m bench bank --bulk`` measures the difference."""

    def do_batch_jobs(self, initblock: DbBlock, context: dict[str, Any],
                      rows: list[tuple[int, dict[str, Any]]]) -> list[BatchJobResult]:
        checked = [(line, input, _checked(input)) for line, input in rows]
        good = [(line, input, p) for line, input, p in checked if not isinstance(p, BatchJobResult)]
        outcomes: dict[int, tuple[bool, int]] = {}
        if good:
            payload = json.dumps([p for _, _, p in good])
            with initblock.engine.begin() as conn:
                found = conn.execute(text("SELECT o_i, o_ok, o_balance FROM bank_apply_many(CAST(:t AS jsonb))"),
                                     {"t": payload}).all()
            outcomes = {good[i - 1][0]: (bool(ok), int(bal)) for i, ok, bal in found}
        return [p if isinstance(p, BatchJobResult) else _result(line, input, *outcomes[line])
                for line, input, p in checked]


def _result(line: int, input: dict[str, Any], ok: bool, balance: int) -> BatchJobResult:
    """A transaction's result and its ledger line (the same for one row or many per call)."""
    account, kind, amount, txn = input["account"], input["kind"], input["amount"], input.get("txn")
    ledger = {"ledger.csv": _csv_line(line, txn or "", account, kind, amount, "ok" if ok else "rejected",
                                      balance)}
    if not ok:
        return BatchJobResult(
            status=BatchStatus.FAILED,
            messages=[ErrorMessage(msgid=2, errcode="insufficient_funds", field="amount",
                                   vals=[str(amount), str(balance)])],
            blobrows=ledger,
        )
    return BatchJobResult(status=BatchStatus.SUCCESS, result={"account": account, "balance": balance},
                          blobrows=ledger)


# ---------------------------------------------------------------------------- file intake
TXN_FILE_TYPE = "txn"
TXN_COLUMNS = ("account", "kind", "amount")  # and optionally txn


class TxnFileChecker:
    """File type ``txn``: a CSV (or Parquet, or JSON lines) of transactions with the columns account, kind,
    amount and optionally txn becomes one bank/txn batch, a row per transaction. The header is checked
    here, so that a wrong file is rejected whole (moved to failed/ with the reason); a bad value in one
    row is that row's business failure, reported by the processor. Rows stream from the file in chunks."""

    def check(self, file: IncomingFile, context: dict[str, Any]) -> FileCheck:
        # account and txn stay text even when they look like numbers ("0042")
        frames = file.frames(chunksize=20_000, dtype={"account": "string", "kind": "string", "txn": "string"})
        first = next(frames, None)
        if first is None:
            return FileCheck(ok=False, error="no transactions in the file")
        missing = [c for c in TXN_COLUMNS if c not in first.columns]
        extra = sorted(set(map(str, first.columns)) - {*TXN_COLUMNS, "txn", "line"})
        if missing or extra:  # the file's own names only when few and short: a rejection never echoes content
            return FileCheck(ok=False, error=f"columns must be {', '.join(TXN_COLUMNS)}[, txn]: "
                                             f"missing {missing}, unexpected {column_summary(extra)}")
        return FileCheck(ok=True, app=APP, op=OP, context={**context, "file": file.name},
                         rows=itertools.chain([first], frames))


def register(jm: JobManager) -> None:
    if not first_registration(jm, APP):
        return
    jm.register_initializer(APP, BankInitializer(lambda: jm.store.database_url))
    jm.register_batch_processor(APP, OP, BankTxnProcessor())
    jm.register_file_checker(TXN_FILE_TYPE, TxnFileChecker())


def write_transactions_csv(path: str, txns: Iterable[dict[str, Any]]) -> None:
    """Transactions as a ``txn`` CSV file (path or fsspec URL): what a bank would drop in the intake folder."""
    import fsspec

    with fsspec.open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*TXN_COLUMNS, "txn"])
        writer.writeheader()
        writer.writerows(txns)


# ---------------------------------------------------------------------------- input and expected output
def make_transactions(n: int, naccounts: int = 20, seed: int | None = None,
                      overdraft_every: int = 97) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``n`` transactions on ``naccounts`` accounts, and the opening balances they need.

    Opening balances equal each account's ordinary withdrawals, so no ordinary withdrawal can fail in any
    processing order; every ``overdraft_every``-th transaction withdraws more than an account can ever
    hold, so it fails in every order. The final balances are thus fixed by the input alone."""
    rng = random.Random(seed)
    accounts = [f"acct-{i:04d}" for i in range(naccounts)]
    opening = dict.fromkeys(accounts, 0)
    txns: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        account = rng.choice(accounts)
        if overdraft_every and i % overdraft_every == 0:
            kind, amount = "withdraw", OVERDRAFT
        else:
            kind, amount = rng.choice(("deposit", "withdraw")), rng.randint(1, 10_000)
            if kind == "withdraw":
                opening[account] += amount
        txns.append({"account": account, "kind": kind, "amount": amount, "txn": str(uuid.uuid4())})
    return txns, opening


def expected_balances(txns: Iterable[dict[str, Any]], opening: dict[str, int]) -> tuple[dict[str, int], int]:
    """The final balances computed from the input (applied in order, refusing overdrafts), and how many
    transactions are refused."""
    balances = dict(opening)
    refused = 0
    for t in txns:
        bal = balances.get(t["account"], 0)
        if t["kind"] == "deposit":
            balances[t["account"]] = bal + t["amount"]
        elif bal >= t["amount"]:
            balances[t["account"]] = bal - t["amount"]
        else:
            refused += 1
    return balances, refused


def open_accounts(database_url: str, opening: dict[str, int]) -> None:
    """Create the tables if missing and set the opening balances."""
    block = DbBlock(database_url)
    try:
        ensure_schema(block.engine)
        with block.engine.begin() as conn:
            conn.execute(text("INSERT INTO bank_accounts (account, balance) VALUES (:a, :b) "
                              "ON CONFLICT (account) DO UPDATE SET balance = excluded.balance"),
                         [{"a": a, "b": b} for a, b in opening.items()])
    finally:
        block.close()


def read_balances(database_url: str, accounts: Iterable[str]) -> dict[str, int]:
    block = DbBlock(database_url)
    try:
        with block.engine.connect() as conn:
            rows = conn.execute(text("SELECT account, balance FROM bank_accounts WHERE account = ANY(:a)"),
                                {"a": list(accounts)}).all()
        return {a: int(b) for a, b in rows}
    finally:
        block.close()


def submit_transactions(jm: JobManager, txns: list[dict[str, Any]], nbatches: int,
                        context: dict[str, Any] | None = None) -> list[str]:
    """Split the transactions into ``nbatches`` batches (line numbers restart at 1) and submit them."""
    from alya import BatchInput

    size = -(-len(txns) // max(1, nbatches))
    ids = []
    for start in range(0, len(txns), size):
        part = txns[start:start + size]
        ids.append(jm.batch_submit(APP, OP, context or {"user": "demo"},
                                   [BatchInput(i, t) for i, t in enumerate(part, 1)]))
    return ids


# ---------------------------------------------------------------------------- the deployable flow
jm = example_jobmanager()
register(jm)


@batch_flow(APP, OP)
def bank_txn_flow(batch_id: str | None = None) -> dict[str, Any]:
    """Example batch type bank/txn: deposits and withdrawals.

    A deployment's run works on batch ``batch_id``; without one, on every queued batch of the type."""
    return jm.process_batches(APP, OP, batch_id)


def main(argv: list[str] | None = None) -> None:
    """Demo: generate, submit, process in this process (unless ALYA_DISPATCH=prefect), check balances."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("n", type=int, nargs="?", default=10_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--accounts", type=int, default=50)
    args = parser.parse_args(argv)
    txns, opening = make_transactions(args.n, args.accounts)
    open_accounts(jm.store.database_url, opening)
    t0 = time.monotonic()
    ids = submit_transactions(jm, txns, args.batches)
    if jm.dispatcher is None:
        jm.run(stop_when_idle=True)
    while not all(jm.batch_status(b).status.is_final for b in ids):
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    expected, refused = expected_balances(txns, opening)
    actual = read_balances(jm.store.database_url, expected)
    nfailed = sum(jm.batch_status(b).nfailed for b in ids)
    ok = actual == expected and nfailed == refused
    print(f"{args.n} txns in {len(ids)} batches: {elapsed:.1f}s ({args.n / elapsed:.0f} rows/s); "
          f"refused {nfailed} (expected {refused}); balances {'match' if ok else 'DIFFER'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
