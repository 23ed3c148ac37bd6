//! What became of a job after its answer: its verification verdict (`GET /v1/jobs/{id}`) and
//! which providers the network has slashed (`GET /v1/providers`), so a client can drop results
//! the network later found dishonest.

use serde::Deserialize;

use crate::{decode, read_json, Client, Error, Result};

/// Where a job sampled for verification stands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobStatus {
    /// The job id (the receipt's `job_id`).
    pub id: String,
    /// `pending`, `passed`, `failed` or `unchecked`.
    pub verification: String,
    /// Whether the job's payment went back to the agent (a failed check).
    pub refunded: bool,
    /// Micro-units of the cheating provider's slash paid to the agent.
    #[serde(default)]
    pub compensation: u64,
    /// The serving provider.
    pub provider: Option<String>,
}

impl JobStatus {
    /// Whether the verdict is still to come.
    pub fn is_pending(&self) -> bool {
        self.verification == "pending"
    }
}

/// A provider as the hub's registry shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProviderStanding {
    /// Its address.
    pub address: String,
    /// Micro-units slashed from its stake so far.
    #[serde(default)]
    pub slashed: u64,
    /// Whether it is excluded from scheduling.
    #[serde(default)]
    pub quarantined: bool,
}

impl ProviderStanding {
    /// Whether the network has caught it cheating.
    pub fn caught(&self) -> bool {
        self.slashed > 0 || self.quarantined
    }
}

impl Client {
    /// The verification status of job `id`; `None` for a job never sampled (its receipt's
    /// status is final).
    pub fn job(&self, id: &str) -> Result<Option<JobStatus>> {
        let r = self.http.get(format!("{}/v1/jobs/{id}", self.url)).call()?;
        match read_json(r) {
            Ok(v) => decode(v).map(Some),
            Err(Error::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every provider the hub has seen, with its slashes and quarantine.
    pub fn providers(&self) -> Result<Vec<ProviderStanding>> {
        let mut v = read_json(self.http.get(format!("{}/v1/providers", self.url)).call()?)?;
        decode(v["providers"].take())
    }
}
