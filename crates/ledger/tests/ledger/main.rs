//! Integration tests of the ledger on SQLite and, when `TESSERA_TEST_POSTGRES_URL` is set,
//! PostgreSQL (under `CI` the PostgreSQL half fails instead of skipping when the URL is unset).

mod support;

mod batches;
mod concurrency;
mod crash;
mod operations;
mod properties;
