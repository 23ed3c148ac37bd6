//! Fresh databases per test, so tests run in parallel under nextest.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use sqlx::Connection;
use tessera_ledger::{Ledger, LedgerConfig};
use tessera_protocol::Address;

/// Env var with a PostgreSQL URL whose user may `CREATE DATABASE`.
pub const POSTGRES_ENV: &str = "TESSERA_TEST_POSTGRES_URL";

/// A database that lives as long as this value.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh SQLite file in a temporary directory.
pub fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    TestDb {
        url,
        _dir: Some(dir),
    }
}

/// A fresh PostgreSQL database, or `None` (with a message) when no server is configured.
/// Under `CI` a missing server is a failure: CI must test both backends.
pub async fn postgres() -> Option<TestDb> {
    let Ok(base) = std::env::var(POSTGRES_ENV) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{POSTGRES_ENV} is not set but CI is: run scripts/setup-postgres.sh and export it"
            );
        }
        eprintln!(
            "SKIPPED: PostgreSQL half of this test; set {POSTGRES_ENV} (see scripts/setup-postgres.sh)"
        );
        return None;
    };
    let name = format!("tessera_test_{:016x}", rand::random::<u64>());
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    Some(TestDb {
        url: replace_database(&base, &name),
        _dir: None,
    })
}

fn replace_database(url: &str, name: &str) -> String {
    let (without_query, query) = match url.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = without_query.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match without_query[scheme_end..].find('/') {
        Some(i) => &without_query[..scheme_end + i],
        None => without_query,
    };
    format!("{base}/{name}{query}")
}

/// Runs a test body against SQLite and against PostgreSQL, as two tests.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident => $body:expr;)*) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = $crate::support::sqlite();
                ($body)(db.url.clone()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let Some(db) = $crate::support::postgres().await else { return };
                ($body)(db.url.clone()).await;
            }
        }
    )*};
}

/// A clock the test moves by hand.
#[derive(Clone, Default)]
pub struct ManualClock(pub Arc<AtomicU64>);

impl ManualClock {
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    pub fn install(&self, ledger: Ledger) -> Ledger {
        let now = self.0.clone();
        ledger.with_clock(move || now.load(Ordering::SeqCst))
    }
}

/// A dev-mode ledger with a 5% fee and a 100 s unbonding period.
pub async fn open(url: &str) -> Ledger {
    let config = LedgerConfig {
        unbonding_secs: 100,
        ..LedgerConfig::dev()
    };
    Ledger::open(url, config).await.expect("open ledger")
}

/// A deterministic wallet address.
pub fn wallet(n: u8) -> Address {
    Address::repeat_byte(n)
}

/// Fails the test with the audit's problems unless the books are clean.
pub async fn assert_clean(ledger: &Ledger) -> tessera_ledger::AuditReport {
    let report = ledger.audit().await.expect("audit runs");
    assert!(
        report.is_clean(),
        "audit found problems: {:#?}",
        report.problems()
    );
    report
}
