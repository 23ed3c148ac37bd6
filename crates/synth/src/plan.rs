//! Candidate rows and their content addresses. Candidate `i` takes the `i mod C`-th combination
//! of the variables' values (C combinations, the cartesian product in name order) and samples
//! with seed `spec.seed + i`; its key hashes everything that decides its content, so the same
//! spec against the same model file names the same rows on every run.

use std::collections::BTreeMap;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::spec::{Output, Spec};

/// One row to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its place in the spec's sequence of candidates.
    pub index: u64,
    /// The sampling seed of its requests.
    pub seed: u64,
    /// The variables' values.
    pub variables: BTreeMap<String, String>,
    /// Its content address (sha256, hex).
    pub key: String,
}

/// The candidates of a spec against one model file.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    spec: &'a Spec,
    model_sha256: String,
    combinations: u64,
}

impl<'a> Plan<'a> {
    /// The plan of `spec` on the model file with this sha256.
    pub fn new(spec: &'a Spec, model_sha256: &str) -> Self {
        Self {
            spec,
            model_sha256: model_sha256.to_owned(),
            combinations: spec.combinations().max(1),
        }
    }

    /// The model file's sha256.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    /// Candidate `index`.
    pub fn candidate(&self, index: u64) -> Candidate {
        let mut rest = index % self.combinations;
        let mut variables = BTreeMap::new();
        for v in self.spec.variables.iter().rev() {
            let n = v.values.len() as u64;
            variables.insert(v.name.clone(), v.values[(rest % n) as usize].clone());
            rest /= n;
        }
        let seed = self.spec.seed.wrapping_add(index);
        let (format, schema, response_format) = match &self.spec.output {
            Output::Text => ("text", serde_json::Value::Null, false),
            Output::Json {
                schema,
                response_format,
            } => ("json", schema.as_json().clone(), *response_format),
        };
        let steps: Vec<_> = self
            .spec
            .steps
            .iter()
            .map(|s| json!({"name": s.name, "system": s.system.as_ref().map(|t| t.source()), "prompt": s.prompt.source()}))
            .collect();
        let address = json!({
            "version": 1,
            "model_sha256": self.model_sha256,
            "steps": steps,
            "variables": variables,
            "sampling": self.spec.sampling,
            "output": {"format": format, "schema": schema, "response_format": response_format},
            "seed": seed,
        });
        let key = hex::encode(Sha256::digest(address.to_string().as_bytes()));
        Candidate {
            index,
            seed,
            variables,
            key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(text: &str) -> Spec {
        Spec::parse(Path::new("s.toml"), text).unwrap()
    }

    const SPEC: &str = r#"
name = "t"
model = "m"
rows = 2
[budget]
max_spend = 1000
max_price = 1
[variables]
a = ["x", "y"]
b = { range = [1, 3] }
[[steps]]
name = "out"
prompt = "{a} {b}"
"#;

    #[test]
    fn candidates_walk_the_cartesian_product_then_repeat_with_new_seeds() {
        let s = spec(SPEC);
        let plan = Plan::new(&s, "abc");
        let combos: Vec<_> = (0..6)
            .map(|i| {
                let c = plan.candidate(i);
                format!("{}{}", c.variables["a"], c.variables["b"])
            })
            .collect();
        assert_eq!(combos, ["x1", "x2", "x3", "y1", "y2", "y3"]);
        let again = plan.candidate(6);
        assert_eq!(again.variables, plan.candidate(0).variables);
        assert_ne!(
            again.key,
            plan.candidate(0).key,
            "another seed, another row"
        );
        assert_eq!(again.seed, 6);
    }

    #[test]
    fn keys_depend_on_what_makes_the_row() {
        let s = spec(SPEC);
        let key = Plan::new(&s, "abc").candidate(0).key;
        assert_eq!(key, Plan::new(&s, "abc").candidate(0).key);
        assert_ne!(key, Plan::new(&s, "abd").candidate(0).key, "model file");
        let other = spec(&SPEC.replace("\"{a} {b}\"", "\"{a}, {b}\""));
        assert_ne!(key, Plan::new(&other, "abc").candidate(0).key, "template");
        let other = spec(&SPEC.replace("rows = 2", "rows = 2\n[sampling]\ntemperature = 0.1"));
        assert_ne!(key, Plan::new(&other, "abc").candidate(0).key, "sampling");
        let other = spec(&SPEC.replace("rows = 2", "rows = 5"));
        assert_eq!(
            key,
            Plan::new(&other, "abc").candidate(0).key,
            "more rows, same first row"
        );
    }
}
