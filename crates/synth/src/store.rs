//! The row store: an append-only JSONL file in the output directory holding every paid-for
//! row, accepted or rejected, so that a re-run never pays for a row twice. A request that failed
//! is never written (the hub charged nothing for it; a re-run tries it again). Each line is
//! written and synced before the row counts as done; a line torn by a crash is cut off when the
//! store is next opened. A row whose standing changed after it was stored (its verification
//! came in, its provider was slashed) is appended again under the same key: the last line of a
//! key is the row.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tessera_agent::{Receipt, Usage};

use crate::{Error, Result};

/// The store's file name inside the output directory.
pub const STORE_FILE: &str = "rows.jsonl";

/// Why a paid-for row was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Shorter than `min_chars`.
    TooShort,
    /// Longer than `max_chars`.
    TooLong,
    /// Does not match the spec's `regex`.
    NoMatch,
    /// Not a JSON document.
    NotJson,
    /// JSON that does not conform to the schema.
    Schema,
    /// The checker exited non-zero.
    Checker,
    /// The checker ran past its timeout.
    CheckerTimeout,
    /// Equal to an accepted row.
    Duplicate,
    /// Too similar to an accepted row.
    NearDuplicate,
    /// The budget ran out between two steps of the row.
    BudgetExhausted,
    /// A later step's request failed after its retries (the earlier steps were paid).
    RequestFailed,
    /// One of its jobs failed the network's verification (and was refunded).
    FailedVerification,
    /// Made (in part) by a provider the network later caught cheating.
    ProviderSlashed,
}

impl RejectReason {
    /// The reason's name in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::TooLong => "too_long",
            Self::NoMatch => "no_match",
            Self::NotJson => "not_json",
            Self::Schema => "schema",
            Self::Checker => "checker",
            Self::CheckerTimeout => "checker_timeout",
            Self::Duplicate => "duplicate",
            Self::NearDuplicate => "near_duplicate",
            Self::BudgetExhausted => "budget_exhausted",
            Self::RequestFailed => "request_failed",
            Self::FailedVerification => "failed_verification",
            Self::ProviderSlashed => "provider_slashed",
        }
    }
}

/// What became of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// In the dataset.
    Accepted,
    /// Paid for, not kept.
    Rejected(RejectReason),
}

/// One step's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// The step.
    pub name: String,
    /// What the model wrote.
    pub text: String,
    /// The hub's receipt.
    pub receipt: Receipt,
    /// Token counts.
    pub usage: Usage,
    /// Whether the hub refunded the job (it failed verification): it costs nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refunded: bool,
    /// Micro-units of the cheating provider's slash the hub paid us for this job.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A paid-for row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Content address.
    pub key: String,
    /// Candidate index.
    pub index: u64,
    /// Sampling seed.
    pub seed: u64,
    /// Variable values.
    pub variables: BTreeMap<String, String>,
    /// Its steps, in order.
    pub steps: Vec<StepResult>,
    /// Accepted or why not.
    pub verdict: Verdict,
}

impl Record {
    /// What the row cost, micro-units (refunded jobs cost nothing).
    pub fn cost(&self) -> u64 {
        self.steps
            .iter()
            .filter(|s| !s.refunded)
            .map(|s| s.receipt.cost)
            .sum()
    }

    /// What the hub paid us of cheating providers' slashes for this row's jobs.
    pub fn compensation(&self) -> u64 {
        self.steps.iter().map(|s| s.compensation).sum()
    }

    /// The last step's text (what the filters judge).
    pub fn text(&self) -> &str {
        self.steps.last().map_or("", |s| s.text.as_str())
    }
}

/// The open store.
pub struct Store {
    path: PathBuf,
    file: Mutex<File>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, returning the rows it already holds. A torn last
    /// line (a crash mid-write) is cut off; any other unreadable line is an error.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Record>)> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let path = dir.join(STORE_FILE);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
        };
        let mut records = Vec::new();
        let mut good = 0usize;
        let mut offset = 0usize;
        let mut needs_newline = false;
        for (i, line) in text.split_inclusive(|b| *b == b'\n').enumerate() {
            offset += line.len();
            match serde_json::from_slice::<Record>(line) {
                Ok(r) => {
                    // A last line written whole but for its newline is still a paid row.
                    needs_newline = !line.ends_with(b"\n");
                    records.push(r);
                    good = offset;
                }
                Err(_) if !line.ends_with(b"\n") => break,
                Err(e) => {
                    return Err(Error::Store {
                        path,
                        line: i + 1,
                        message: e.to_string(),
                    })
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
        if good < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - good, "cutting off a torn last line");
            file.set_len(good as u64)
                .map_err(Error::io(format!("truncating {}", path.display())))?;
            file.seek(std::io::SeekFrom::End(0))
                .map_err(Error::io("seeking"))?;
        }
        if needs_newline {
            file.write_all(b"\n")
                .map_err(Error::io(format!("writing {}", path.display())))?;
        }
        Ok((
            Self {
                path,
                file: Mutex::new(file),
            },
            latest(records),
        ))
    }

    /// The rows stored so far (the last line of each key), in the order first stored.
    pub fn read(&self) -> Result<Vec<Record>> {
        let _writing = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let text = std::fs::read(&self.path)
            .map_err(Error::io(format!("reading {}", self.path.display())))?;
        let mut records = Vec::new();
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            records.push(serde_json::from_slice(line).map_err(|e| Error::Store {
                path: self.path.clone(),
                line: i + 1,
                message: e.to_string(),
            })?);
        }
        Ok(latest(records))
    }

    /// Appends a row and syncs it to disk.
    pub fn append(&self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| Error::Io {
            context: "encoding a row".into(),
            source: e.into(),
        })?;
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let context = || format!("writing {}", self.path.display());
        file.write_all(line.as_bytes())
            .map_err(Error::io(context()))?;
        file.sync_data().map_err(Error::io(context()))
    }
}

/// One record per key: the last written, at the place of the first.
fn latest(records: Vec<Record>) -> Vec<Record> {
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    for r in records {
        match at.get(&r.key) {
            Some(&i) => out[i] = r,
            None => {
                at.insert(r.key.clone(), out.len());
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, verdict: Verdict, cost: u64) -> Record {
        Record {
            key: key.into(),
            index: 0,
            seed: 1,
            variables: BTreeMap::from([("a".into(), "x".into())]),
            steps: vec![StepResult {
                name: "out".into(),
                text: "hello".into(),
                receipt: Receipt {
                    cost,
                    ..Default::default()
                },
                usage: Usage::default(),
                refunded: false,
                compensation: 0,
            }],
            verdict,
        }
    }

    #[test]
    fn a_row_stored_again_replaces_itself_and_a_refund_costs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.append(&record("a", Verdict::Accepted, 5)).unwrap();
        store.append(&record("b", Verdict::Accepted, 7)).unwrap();
        let mut dropped = record("a", Verdict::Rejected(RejectReason::FailedVerification), 5);
        dropped.steps[0].refunded = true;
        dropped.steps[0].compensation = 300;
        store.append(&dropped).unwrap();
        let rows = store.read().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key, "a");
        assert_eq!(rows[0].verdict, dropped.verdict);
        assert_eq!((rows[0].cost(), rows[0].compensation()), (0, 300));
        drop(store);
        let (_, reopened) = Store::open(dir.path()).unwrap();
        assert_eq!(reopened, rows);
        assert_eq!(reopened.iter().map(Record::cost).sum::<u64>(), 7);
    }

    #[test]
    fn rows_survive_reopening_and_a_torn_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (store, old) = Store::open(dir.path()).unwrap();
        assert!(old.is_empty());
        store.append(&record("a", Verdict::Accepted, 5)).unwrap();
        store
            .append(&record("b", Verdict::Rejected(RejectReason::Checker), 7))
            .unwrap();
        drop(store);
        // A crash in the middle of a third line.
        let path = dir.path().join(STORE_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"key\":\"c\",\"ind").unwrap();
        drop(f);
        let (store, rows) = Store::open(dir.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].verdict, Verdict::Rejected(RejectReason::Checker));
        assert_eq!(rows.iter().map(Record::cost).sum::<u64>(), 12);
        store.append(&record("d", Verdict::Accepted, 1)).unwrap();
        drop(store);
        let (_, rows) = Store::open(dir.path()).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["a", "b", "d"]
        );
    }

    #[test]
    fn a_corrupt_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STORE_FILE), "not json\n{}\n").unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(Error::Store { line: 1, .. })
        ));
    }
}
