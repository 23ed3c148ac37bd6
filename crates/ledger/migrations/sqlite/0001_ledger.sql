-- Tessera ledger, SQLite flavour. Keep in step with ../postgres/0001_ledger.sql: the two differ
-- only in how auto-increment keys are spelled and in SQLite's WITHOUT ROWID journal table (one
-- B-tree insert per row instead of two: a third more settlements per second).

-- Balances in micro-units. Only the issuance account, the source of all minted money, may be
-- negative: its balance is -(minted - burned).
CREATE TABLE accounts (
    id      TEXT PRIMARY KEY,
    balance BIGINT NOT NULL DEFAULT 0,
    CHECK (balance >= 0 OR id = 'system:issuance')
);

-- One row per committed operation; idem_key makes retries return the original result.
CREATE TABLE transactions (
    id         INTEGER PRIMARY KEY,
    idem_key   TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    request    TEXT NOT NULL,
    result     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Double entry: the rows of one transaction sum to zero. No index by account yet: the audit
-- scans everything anyway, and each index costs every settlement a B-tree insert.
CREATE TABLE entries (
    tx_id   BIGINT NOT NULL REFERENCES transactions (id),
    seq     BIGINT NOT NULL,
    account TEXT NOT NULL REFERENCES accounts (id),
    amount  BIGINT NOT NULL,
    PRIMARY KEY (tx_id, seq)
) WITHOUT ROWID;

CREATE TABLE escrows (
    id       INTEGER PRIMARY KEY,
    payer    TEXT NOT NULL,
    held     BIGINT NOT NULL CHECK (held >= 0),
    captured BIGINT NOT NULL DEFAULT 0,
    released BIGINT NOT NULL DEFAULT 0,
    is_open  BIGINT NOT NULL DEFAULT 1,
    CHECK (captured + released <= held)
);

CREATE TABLE stakes (
    account TEXT PRIMARY KEY,
    amount  BIGINT NOT NULL CHECK (amount >= 0)
);

CREATE TABLE unbondings (
    id         INTEGER PRIMARY KEY,
    account    TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount > 0),
    release_at BIGINT NOT NULL,
    withdrawn  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX unbondings_pending ON unbondings (account, withdrawn, release_at);

CREATE TABLE supply (
    id     BIGINT PRIMARY KEY CHECK (id = 1),
    minted BIGINT NOT NULL CHECK (minted >= 0),
    burned BIGINT NOT NULL CHECK (burned >= 0)
);
INSERT INTO supply (id, minted, burned) VALUES (1, 0, 0);

CREATE TABLE nonces (
    signer TEXT NOT NULL,
    scope  TEXT NOT NULL,
    nonce  BIGINT NOT NULL,
    PRIMARY KEY (signer, scope, nonce)
);

INSERT INTO accounts (id, balance) VALUES
    ('system:issuance', 0), ('system:treasury', 0), ('system:fees', 0), ('system:escrow', 0),
    ('system:stake', 0), ('system:unbonding', 0);
