//! The row store: an append-only JSONL file in the output directory holding every paid-for
//! row, accepted or rejected, so that a re-run never pays for a row twice. A request that failed
//! is never written (the hub charged nothing for it; a re-run tries it again). Each line is
//! written and synced before the row counts as done; a line torn by a crash is cut off when the
//! store is next opened.

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
    /// What the row cost, micro-units.
    pub fn cost(&self) -> u64 {
        self.steps.iter().map(|s| s.receipt.cost).sum()
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
            records,
        ))
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
            }],
            verdict,
        }
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
