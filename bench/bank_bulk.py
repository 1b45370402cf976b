"""The bank example with its bulk processor (``flows.bank.BankTxnBulkProcessor``: up to ALYA_BULK_ROWS
transactions per call, one statement and one commit): what ``python -m bench bank --bulk`` runs as
``alya worker bench.bank_bulk:jm``. The same tables, the same outcomes as ``flows.bank:jm``."""

from __future__ import annotations

from alya import JobManager
from flows import bank

jm = JobManager.from_env()
jm.register_initializer(bank.APP, bank.BankInitializer(lambda: jm.store.database_url))
jm.register_batch_processor(bank.APP, bank.OP, bank.BankTxnBulkProcessor())
