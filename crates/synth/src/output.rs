//! The dataset files: `data.jsonl` and `data.parquet` (one row per accepted row, the same
//! columns in both), `manifest.json` (what was spent, kept and rejected) and a Hugging Face
//! dataset card `README.md` (<https://huggingface.co/docs/hub/datasets-cards>: a YAML header
//! with `configs`/`data_files`, license, task categories and size category).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use serde_json::{json, Map, Value};

use crate::run::Report;
use crate::spec::Spec;
use crate::store::Record;
use crate::{Error, Result};

/// The dataset's JSON Lines file.
pub const JSONL_FILE: &str = "data.jsonl";
/// The dataset's Parquet file.
pub const PARQUET_FILE: &str = "data.parquet";
/// The manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The dataset card.
pub const CARD_FILE: &str = "README.md";

fn strings<'a>(records: &[&'a Record], f: impl Fn(&'a Record) -> String) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(records.iter().map(|r| f(r))))
}

fn string_lists<'a>(
    records: &[&'a Record],
    f: impl Fn(&'a crate::store::StepResult) -> String,
) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for r in records {
        for s in &r.steps {
            b.values().append_value(f(s));
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn model_sha256(r: &Record) -> String {
    r.steps
        .first()
        .and_then(|s| s.receipt.model_sha256.clone())
        .unwrap_or_default()
}

/// The dataset's rows as JSON objects: variables, step outputs, provenance.
pub fn rows(spec: &Spec, records: &[&Record]) -> Vec<Value> {
    records
        .iter()
        .map(|r| {
            let mut row = Map::new();
            row.insert("id".into(), json!(r.key));
            for v in &spec.variables {
                row.insert(v.name.clone(), json!(r.variables.get(&v.name)));
            }
            for s in &r.steps {
                row.insert(s.name.clone(), json!(s.text));
            }
            row.insert("seed".into(), json!(r.seed));
            row.insert("model_sha256".into(), json!(model_sha256(r)));
            let each = |f: &dyn Fn(&crate::store::StepResult) -> String| -> Vec<String> {
                r.steps.iter().map(f).collect()
            };
            row.insert("job_ids".into(), json!(each(&|s| s.receipt.job_id.clone())));
            row.insert(
                "providers".into(),
                json!(each(&|s| s.receipt.provider.to_lowercase())),
            );
            row.insert(
                "commitment_digests".into(),
                json!(each(&|s| s
                    .receipt
                    .commitment_digest
                    .clone()
                    .unwrap_or_default())),
            );
            row.insert(
                "verifications".into(),
                json!(each(&|s| s.receipt.verification.clone())),
            );
            row.insert("cost".into(), json!(r.cost()));
            Value::Object(row)
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    // Written beside and renamed, so a crash never leaves a half-written file under the name.
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("renaming to {}", path.display())))
}

fn parquet(spec: &Spec, records: &[&Record]) -> Result<Vec<u8>> {
    let mut columns: Vec<(String, ArrayRef)> =
        vec![("id".into(), strings(records, |r| r.key.clone()))];
    for v in &spec.variables {
        columns.push((
            v.name.clone(),
            strings(records, |r| {
                r.variables.get(&v.name).cloned().unwrap_or_default()
            }),
        ));
    }
    for (i, step) in spec.steps.iter().enumerate() {
        columns.push((
            step.name.clone(),
            strings(records, move |r| {
                r.steps.get(i).map(|s| s.text.clone()).unwrap_or_default()
            }),
        ));
    }
    columns.push((
        "seed".into(),
        Arc::new(UInt64Array::from_iter_values(
            records.iter().map(|r| r.seed),
        )),
    ));
    columns.push(("model_sha256".into(), strings(records, model_sha256)));
    columns.push((
        "job_ids".into(),
        string_lists(records, |s| s.receipt.job_id.clone()),
    ));
    columns.push((
        "providers".into(),
        string_lists(records, |s| s.receipt.provider.to_lowercase()),
    ));
    columns.push((
        "commitment_digests".into(),
        string_lists(records, |s| {
            s.receipt.commitment_digest.clone().unwrap_or_default()
        }),
    ));
    columns.push((
        "verifications".into(),
        string_lists(records, |s| s.receipt.verification.clone()),
    ));
    columns.push((
        "cost".into(),
        Arc::new(UInt64Array::from_iter_values(
            records.iter().map(|r| r.cost()),
        )),
    ));
    let batch = RecordBatch::try_from_iter(columns).map_err(|e| Error::Parquet(e.to_string()))?;
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None)
        .map_err(|e| Error::Parquet(e.to_string()))?;
    writer
        .write(&batch)
        .map_err(|e| Error::Parquet(e.to_string()))?;
    writer.close().map_err(|e| Error::Parquet(e.to_string()))?;
    Ok(bytes)
}

/// Hugging Face's size category for `n` rows.
pub fn size_category(n: usize) -> &'static str {
    match n {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        _ => "1M<n<10M",
    }
}

/// The manifest of a run's output.
pub fn manifest(spec: &Spec, report: &Report) -> Value {
    let mut providers: BTreeMap<String, u64> = BTreeMap::new();
    for r in report.accepted() {
        for s in &r.steps {
            *providers
                .entry(s.receipt.provider.to_lowercase())
                .or_insert(0) += 1;
        }
    }
    let accepted = report.accepted().count();
    json!({
        "name": spec.name,
        "spec_sha256": spec.sha256,
        "model": report.model.id,
        "model_sha256": report.model.sha256,
        "rows_wanted": spec.rows,
        "rows": accepted,
        "ending": report.ending,
        "rows_paid": report.records.len(),
        "rejected": report.rejected(),
        "failed_this_run": report.failed,
        "spend": report.spent,
        "compensation": report.records.iter().map(Record::compensation).sum::<u64>(),
        "spend_accepted": report.accepted().map(Record::cost).sum::<u64>(),
        "spend_this_run": report.spent_this_run,
        "max_spend": spec.budget.max_spend,
        "max_price": spec.budget.max_price,
        "providers": providers,
        "completion_tokens": report.records.iter().flat_map(|r| &r.steps).map(|s| s.usage.completion_tokens).sum::<u64>(),
        "prompt_tokens": report.records.iter().flat_map(|r| &r.steps).map(|s| s.usage.prompt_tokens).sum::<u64>(),
        "files": {"jsonl": JSONL_FILE, "parquet": PARQUET_FILE},
    })
}

fn yaml_string(s: &str) -> String {
    // A JSON string is a valid YAML flow scalar.
    Value::String(s.to_owned()).to_string()
}

/// The dataset card.
pub fn card(spec: &Spec, report: &Report) -> String {
    let rows = report.accepted().count();
    let categories = if spec.task_categories.is_empty() {
        vec!["text-generation".to_owned()]
    } else {
        spec.task_categories.clone()
    };
    let mut out = String::from("---\n");
    out += &format!("license: {}\n", yaml_string(&spec.license));
    out += "task_categories:\n";
    for c in &categories {
        out += &format!("- {}\n", yaml_string(c));
    }
    out += &format!("size_categories:\n- {}\n", yaml_string(size_category(rows)));
    out += "tags:\n- synthetic\n- tessera\n";
    out += &format!("pretty_name: {}\n", yaml_string(&spec.name));
    out += &format!("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {PARQUET_FILE}\n");
    out += "---\n\n";
    out += &format!("# {}\n\n", spec.name);
    if !spec.description.is_empty() {
        out += &format!("{}\n\n", spec.description.trim());
    }
    out += &format!(
        "Synthetic data made with `tessera synth` on the Tessera network: every row names the job, \
         the provider, the model file (sha256), the seed and the digest of the provider's commitment \
         that produced it, and where that job stood with the network's verification.\n\n\
         ## Figures\n\n\
         | | |\n|---|---|\n\
         | rows | {rows} of {wanted} wanted |\n\
         | model | `{model}` (sha256 `{sha}`) |\n\
         | rows paid for | {paid} |\n\
         | rejected | {rejected} |\n\
         | spend | {spend} micro-units (cap {cap}) |\n\
         | spec sha256 | `{spec_sha}` |\n\n\
         ## Columns\n\n\
         Variables: {vars}. Step outputs: {steps}. Provenance: `id` (the row's content address), `seed`, \
         `model_sha256`, `job_ids`, `providers`, `commitment_digests`, `verifications` (one per step), `cost` (micro-units).\n\n\
         ## Spec\n\n```toml\n{source}\n```\n",
        wanted = spec.rows,
        model = report.model.id,
        sha = report.model.sha256,
        paid = report.records.len(),
        rejected = serde_json::to_string(&report.rejected()).unwrap_or_default(),
        spend = report.spent,
        cap = spec.budget.max_spend,
        spec_sha = spec.sha256,
        vars = list(spec.variables.iter().map(|v| v.name.as_str())),
        steps = list(spec.steps.iter().map(|s| s.name.as_str())),
        source = spec.source.trim_end().replace("```", "` ` `"),
    );
    out
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Writes `data.jsonl`, `data.parquet`, `manifest.json` and `README.md` into `out`.
pub fn write_dataset(spec: &Spec, report: &Report, out: &Path) -> Result<()> {
    let accepted: Vec<&Record> = report.accepted().collect();
    let mut jsonl = String::new();
    for row in rows(spec, &accepted) {
        jsonl += &row.to_string();
        jsonl.push('\n');
    }
    write(&out.join(JSONL_FILE), jsonl.as_bytes())?;
    write(&out.join(PARQUET_FILE), &parquet(spec, &accepted)?)?;
    let manifest = serde_json::to_string_pretty(&manifest(spec, report)).unwrap_or_default();
    write(&out.join(MANIFEST_FILE), manifest.as_bytes())?;
    write(&out.join(CARD_FILE), card(spec, report).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_categories_follow_the_hub_buckets() {
        assert_eq!(size_category(3), "n<1K");
        assert_eq!(size_category(1_000), "1K<n<10K");
        assert_eq!(size_category(250_000), "100K<n<1M");
    }
}
