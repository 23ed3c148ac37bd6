//! A dataset spec: a TOML file naming the model, the prompt templates and their variables, the
//! rows wanted, sampling, filters, deduplication, the budget and concurrency. Every mistake is
//! refused when the spec is read (before anything is sent, so before any money moves), with
//! the line of the offending value.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::schema::Schema;
use crate::template::Template;
use crate::{Error, Result};

/// The most rows one spec may ask for.
pub const MAX_ROWS: u64 = 10_000_000;
/// The most requests in flight one spec may ask for.
pub const MAX_CONCURRENCY: u64 = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "default_license")]
    license: String,
    #[serde(default)]
    task_categories: Vec<String>,
    model: Spanned<String>,
    rows: Spanned<u64>,
    #[serde(default)]
    max_candidates: Option<Spanned<u64>>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    concurrency: Option<Spanned<u64>>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    verify_wait_secs: Option<u64>,
    #[serde(default)]
    tier: Option<Spanned<String>>,
    #[serde(default)]
    sampling: RawSampling,
    budget: RawBudget,
    #[serde(default)]
    variables: BTreeMap<String, Spanned<toml::Value>>,
    steps: Spanned<Vec<RawStep>>,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    filters: RawFilters,
    #[serde(default)]
    dedup: Dedup,
}

fn default_license() -> String {
    "other".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    max_tokens: Option<Spanned<u32>>,
    #[serde(default)]
    stop: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_spend: Spanned<u64>,
    max_price: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    #[serde(default)]
    system: Option<Spanned<String>>,
    prompt: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default)]
    schema: Option<Spanned<toml::Value>>,
    #[serde(default)]
    schema_file: Option<Spanned<String>>,
    #[serde(default)]
    response_format: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilters {
    min_chars: Option<usize>,
    max_chars: Option<usize>,
    regex: Option<Spanned<String>>,
    checker: Option<Spanned<RawChecker>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChecker {
    /// An interpreter on the PATH (`python3`); without one the script runs by itself.
    run: Option<String>,
    /// The checker, relative to the spec's directory.
    script: String,
    timeout_secs: Option<u64>,
}

/// Sampling parameters sent with every request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sampling {
    /// Temperature (default 0.7).
    pub temperature: f32,
    /// Nucleus filter.
    pub top_p: Option<f32>,
    /// Top-k filter.
    pub top_k: Option<u32>,
    /// Most tokens per step.
    pub max_tokens: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// The spending limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most micro-units the whole dataset may cost, never exceeded.
    pub max_spend: u64,
    /// The most micro-units per generated token any provider may charge.
    pub max_price: u64,
    /// Line of `max_spend` in the spec.
    pub max_spend_line: usize,
}

/// A variable and its values, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Its name in templates.
    pub name: String,
    /// Its values.
    pub values: Vec<String>,
}

/// One request of a row; its output is the variable `{name}` for the steps after it.
#[derive(Debug, Clone)]
pub struct Step {
    /// The step's name (a column of the dataset).
    pub name: String,
    /// The system message.
    pub system: Option<Template>,
    /// The user message.
    pub prompt: Template,
}

/// What the last step should produce.
#[derive(Debug, Clone)]
pub enum Output {
    /// Free text.
    Text,
    /// A JSON document under a schema.
    Json {
        /// The schema rows must conform to (checked as a filter).
        schema: Schema,
        /// Also ask the API for structured output (`response_format: json_schema`).
        response_format: bool,
    },
}

/// A command that gets a row as JSON on stdin and accepts it by exiting 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checker {
    /// The interpreter, when there is one.
    pub run: Option<PathBuf>,
    /// The script.
    pub script: PathBuf,
    /// How long it may take per row (default 30 s).
    pub timeout: Duration,
}

/// Filters a row must pass, on the last step's text.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Fewest characters.
    pub min_chars: Option<usize>,
    /// Most characters.
    pub max_chars: Option<usize>,
    /// A pattern the text must match somewhere.
    pub regex: Option<regex::Regex>,
    /// The checker command.
    pub checker: Option<Checker>,
}

/// Duplicate removal.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dedup {
    /// Drop rows whose text equals an accepted row's (after case and whitespace folding).
    #[serde(default = "yes")]
    pub exact: bool,
    /// Drop rows whose estimated Jaccard similarity (MinHash over word shingles) to an
    /// accepted row is at least this.
    #[serde(default)]
    pub near_threshold: Option<f64>,
}

fn yes() -> bool {
    true
}

impl Default for Dedup {
    fn default() -> Self {
        Self {
            exact: true,
            near_threshold: None,
        }
    }
}

/// A checked spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its text.
    pub source: String,
    /// sha256 of its text, hex.
    pub sha256: String,
    /// The dataset's name.
    pub name: String,
    /// What the dataset is.
    pub description: String,
    /// The license of the dataset card (an SPDX-style id as Hugging Face lists them).
    pub license: String,
    /// Hugging Face task categories.
    pub task_categories: Vec<String>,
    /// The model, by name or sha256.
    pub model: String,
    /// Line of `model` in the spec.
    pub model_line: usize,
    /// Rows wanted.
    pub rows: u64,
    /// The most candidate rows tried (default 4 × rows): bounds the spend of a spec whose
    /// filters reject everything.
    pub max_candidates: u64,
    /// The base seed; candidate `i` samples with `seed + i`.
    pub seed: u64,
    /// Requests in flight.
    pub concurrency: usize,
    /// Attempts per request after a transient failure (default 2).
    pub retries: u32,
    /// How the hub schedules and prices the run's requests (`tier`, default `interactive`).
    pub tier: Tier,
    /// How long the end of a run waits for the verdicts of its jobs sampled for verification
    /// (`verify_wait_secs`, default 60), so rows the network finds dishonest are replaced.
    pub verify_wait: std::time::Duration,
    /// Sampling.
    pub sampling: Sampling,
    /// Spending limits.
    pub budget: Budget,
    /// Variables, by name.
    pub variables: Vec<Variable>,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Output form.
    pub output: Output,
    /// Filters.
    pub filters: Filters,
    /// Deduplication.
    pub dedup: Dedup,
}

/// How the hub schedules and prices a run's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tier {
    /// Served as soon as a provider is free, at its price.
    #[default]
    Interactive,
    /// OpenAI's `service_tier: "flex"`: served on idle capacity only (interactive requests go
    /// first), at the hub's batch discount; `max_price` is the bid against the discounted price.
    Batch,
}

/// 1-based line of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

struct Reader<'a> {
    path: &'a Path,
    source: &'a str,
}

impl Reader<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> Error {
        Error::Spec {
            path: self.path.to_owned(),
            line: line_of(self.source, span.start),
            message: message.into(),
        }
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn variable(&self, name: &str, value: &Spanned<toml::Value>) -> Result<Variable> {
        let err = |m: String| self.err(value.span(), format!("variable `{name}`: {m}"));
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        };
        let values = match value.get_ref() {
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| err("list items must be strings or numbers".into()))
                })
                .collect::<Result<Vec<_>>>()?,
            toml::Value::Table(t) => match (t.get("range"), t.get("file"), t.len()) {
                (Some(toml::Value::Array(r)), None, 1) => match r.as_slice() {
                    [toml::Value::Integer(a), toml::Value::Integer(b)]
                        if a <= b && b - a < 1_000_000 =>
                    {
                        (*a..=*b).map(|i| i.to_string()).collect()
                    }
                    _ => return Err(err(
                        "`range` is [first, last] with first <= last (at most a million values)"
                            .into(),
                    )),
                },
                (None, Some(toml::Value::String(file)), 1) => {
                    let path = self.dir().join(file);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                _ => {
                    return Err(err(
                        "a table must be `{ range = [first, last] }` or `{ file = \"seeds.txt\" }`"
                            .into(),
                    ))
                }
            },
            _ => {
                return Err(err(
                    "must be a list, `{ range = [a, b] }` or `{ file = \"...\" }`".into(),
                ))
            }
        };
        if values.is_empty() {
            return Err(err("has no values".into()));
        }
        Ok(Variable {
            name: name.to_owned(),
            values,
        })
    }

    fn template(&self, text: &Spanned<String>, known: &[String], what: &str) -> Result<Template> {
        let t = Template::parse(text.get_ref())
            .map_err(|m| self.err(text.span(), format!("{what}: {m}")))?;
        for v in t.variables() {
            if !known.iter().any(|k| k == v) {
                return Err(self.err(
                    text.span(),
                    format!(
                        "{what} uses unknown variable `{{{v}}}` (known: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(t)
    }

    fn output(&self, raw: &RawOutput) -> Result<Output> {
        let format = raw.format.as_ref().map_or("text", |f| f.get_ref().as_str());
        match format {
            "text" => {
                if let Some(s) = &raw.schema {
                    return Err(self.err(s.span(), "a schema needs `format = \"json\"`"));
                }
                Ok(Output::Text)
            }
            "json" => {
                let (schema, span) = match (&raw.schema, &raw.schema_file) {
                    (Some(s), None) => (
                        serde_json::to_value(s.get_ref())
                            .map_err(|e| self.err(s.span(), e.to_string()))?,
                        s.span(),
                    ),
                    (None, Some(f)) => {
                        let path = self.dir().join(f.get_ref());
                        let text = std::fs::read_to_string(&path).map_err(|e| {
                            self.err(f.span(), format!("cannot read {}: {e}", path.display()))
                        })?;
                        let v = serde_json::from_str(&text).map_err(|e| {
                            self.err(f.span(), format!("{} is not JSON: {e}", path.display()))
                        })?;
                        (v, f.span())
                    }
                    _ => {
                        let span = raw.format.as_ref().map_or(0..0, |f| f.span());
                        return Err(self.err(
                            span,
                            "`format = \"json\"` needs exactly one of `schema` or `schema_file`",
                        ));
                    }
                };
                let schema = Schema::compile(schema)
                    .map_err(|m| self.err(span, format!("invalid JSON Schema: {m}")))?;
                Ok(Output::Json {
                    schema,
                    response_format: raw.response_format,
                })
            }
            other => Err(self.err(
                raw.format.as_ref().map_or(0..0, |f| f.span()),
                format!("unknown output format `{other}` (text or json)"),
            )),
        }
    }

    fn checker(&self, raw: &Spanned<RawChecker>) -> Result<Checker> {
        let c = raw.get_ref();
        let script = self.dir().join(&c.script);
        if !script.is_file() {
            return Err(self.err(
                raw.span(),
                format!("the checker {} does not exist", script.display()),
            ));
        }
        let run = match &c.run {
            None => None,
            Some(program) => Some(find_program(program).ok_or_else(|| {
                self.err(
                    raw.span(),
                    format!("the checker's interpreter `{program}` is not on the PATH"),
                )
            })?),
        };
        Ok(Checker {
            run,
            script,
            timeout: Duration::from_secs(c.timeout_secs.unwrap_or(30).max(1)),
        })
    }
}

/// `program` as a path, or the first match on the PATH.
fn find_program(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

impl Spec {
    /// Reads and checks the spec at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .map_err(Error::io(format!("reading {}", path.display())))?;
        Self::parse(path, &source)
    }

    /// Checks the spec text `source` (read from `path`, against which relative files resolve).
    pub fn parse(path: &Path, source: &str) -> Result<Self> {
        let reader = Reader { path, source };
        let raw: RawSpec = toml::from_str(source).map_err(|e| Error::Spec {
            path: path.to_owned(),
            line: line_of(source, e.span().map_or(0, |s| s.start)),
            message: e.message().to_owned(),
        })?;
        let rows = *raw.rows.get_ref();
        if !(1..=MAX_ROWS).contains(&rows) {
            return Err(reader.err(
                raw.rows.span(),
                format!("rows must be between 1 and {MAX_ROWS}"),
            ));
        }
        let max_candidates = match &raw.max_candidates {
            Some(m) if *m.get_ref() < rows => {
                return Err(reader.err(m.span(), "max_candidates must be at least rows"))
            }
            Some(m) => *m.get_ref(),
            None => rows.saturating_mul(4),
        };
        let tier = match &raw.tier {
            None => Tier::Interactive,
            Some(t) => match t.get_ref().as_str() {
                "interactive" => Tier::Interactive,
                "batch" => Tier::Batch,
                _ => {
                    return Err(reader.err(
                        t.span(),
                        "tier must be `interactive` or `batch` (idle capacity at the hub's batch discount)",
                    ))
                }
            },
        };
        let concurrency = match &raw.concurrency {
            Some(c) if !(1..=MAX_CONCURRENCY).contains(c.get_ref()) => {
                return Err(reader.err(
                    c.span(),
                    format!("concurrency must be between 1 and {MAX_CONCURRENCY}"),
                ))
            }
            Some(c) => *c.get_ref() as usize,
            None => 1,
        };
        let max_tokens = match &raw.sampling.max_tokens {
            Some(m) if *m.get_ref() == 0 => {
                return Err(reader.err(m.span(), "max_tokens must be at least 1"))
            }
            Some(m) => *m.get_ref(),
            None => 256,
        };
        let budget = Budget {
            max_spend: *raw.budget.max_spend.get_ref(),
            max_price: *raw.budget.max_price.get_ref(),
            max_spend_line: line_of(source, raw.budget.max_spend.span().start),
        };
        if budget.max_price == 0 {
            return Err(reader.err(raw.budget.max_price.span(), "max_price must be at least 1"));
        }
        let variables = raw
            .variables
            .iter()
            .map(|(name, value)| reader.variable(name, value))
            .collect::<Result<Vec<_>>>()?;
        let mut known: Vec<String> = variables.iter().map(|v| v.name.clone()).collect();
        if raw.steps.get_ref().is_empty() {
            return Err(reader.err(raw.steps.span(), "a spec needs at least one [[steps]]"));
        }
        let mut steps = Vec::new();
        for s in raw.steps.get_ref() {
            let name = s.name.get_ref().clone();
            if known.contains(&name) || name.is_empty() || is_reserved_column(&name) {
                return Err(reader.err(
                    s.name.span(),
                    format!("step name `{name}` is empty, reserved, or already a variable or step"),
                ));
            }
            let system = s
                .system
                .as_ref()
                .map(|t| reader.template(t, &known, &format!("step `{name}`'s system")))
                .transpose()?;
            let prompt = reader.template(&s.prompt, &known, &format!("step `{name}`'s prompt"))?;
            known.push(name.clone());
            steps.push(Step {
                name,
                system,
                prompt,
            });
        }
        let output = reader.output(&raw.output)?;
        let filters = Filters {
            min_chars: raw.filters.min_chars,
            max_chars: raw.filters.max_chars,
            regex: raw
                .filters
                .regex
                .as_ref()
                .map(|r| {
                    regex::Regex::new(r.get_ref())
                        .map_err(|e| reader.err(r.span(), format!("invalid regex: {e}")))
                })
                .transpose()?,
            checker: raw
                .filters
                .checker
                .as_ref()
                .map(|c| reader.checker(c))
                .transpose()?,
        };
        if let Some(t) = raw.dedup.near_threshold {
            if !(t > 0.0 && t <= 1.0) {
                let line = source
                    .lines()
                    .position(|l| l.trim_start().starts_with("near_threshold"))
                    .map_or(1, |i| i + 1);
                return Err(Error::Spec {
                    path: path.to_owned(),
                    line,
                    message: "near_threshold must be in (0, 1]".into(),
                });
            }
        }
        Ok(Self {
            path: path.to_owned(),
            sha256: hex::encode(Sha256::digest(source.as_bytes())),
            source: source.to_owned(),
            name: raw.name,
            description: raw.description,
            license: raw.license,
            task_categories: raw.task_categories,
            model_line: line_of(source, raw.model.span().start),
            model: raw.model.into_inner(),
            rows,
            max_candidates,
            seed: raw.seed,
            concurrency,
            retries: raw.retries.unwrap_or(2),
            tier,
            verify_wait: std::time::Duration::from_secs(raw.verify_wait_secs.unwrap_or(60)),
            sampling: Sampling {
                temperature: raw.sampling.temperature.unwrap_or(0.7),
                top_p: raw.sampling.top_p,
                top_k: raw.sampling.top_k,
                max_tokens,
                stop: raw.sampling.stop,
            },
            budget,
            variables,
            steps,
            output,
            filters,
            dedup: raw.dedup,
        })
    }

    /// How many combinations of variable values there are.
    pub fn combinations(&self) -> u64 {
        self.variables
            .iter()
            .map(|v| v.values.len() as u64)
            .try_fold(1u64, u64::checked_mul)
            .unwrap_or(u64::MAX)
    }
}

/// Columns of the dataset that are not variables or steps.
pub const PROVENANCE_COLUMNS: &[&str] = &[
    "id",
    "seed",
    "model_sha256",
    "job_ids",
    "providers",
    "commitment_digests",
    "verifications",
    "cost",
];

fn is_reserved_column(name: &str) -> bool {
    PROVENANCE_COLUMNS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"
name = "pairs"
model = "smollm2-135m"
rows = 3

[budget]
max_spend = 100000
max_price = 20

[variables]
topic = ["cats", "trains"]
n = { range = [1, 3] }

[[steps]]
name = "question"
prompt = "Ask a question about {topic} with the number {n}."

[[steps]]
name = "answer"
prompt = "Answer briefly: {question}"
"#;

    fn parse(text: &str) -> Result<Spec> {
        Spec::parse(Path::new("spec.toml"), text)
    }

    fn refused(text: &str) -> (usize, String) {
        match parse(text) {
            Err(Error::Spec { line, message, .. }) => (line, message),
            other => panic!("expected a spec error, got {other:?}"),
        }
    }

    #[test]
    fn a_good_spec_reads() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.rows, 3);
        assert_eq!(s.max_candidates, 12);
        assert_eq!(s.combinations(), 6);
        assert_eq!(s.steps[1].prompt.variables(), vec!["question"]);
        assert_eq!(s.variables[0].values, vec!["1", "2", "3"]);
    }

    #[test]
    fn an_unknown_variable_names_its_line() {
        let (line, message) = refused(&GOOD.replace("{question}", "{questoin}"));
        assert_eq!(line, 20, "{message}");
        assert!(
            message.contains("unknown variable `{questoin}`"),
            "{message}"
        );
    }

    #[test]
    fn a_later_steps_output_is_not_visible_earlier() {
        let (line, message) = refused(&GOOD.replace("the number {n}", "the number {answer}"));
        assert_eq!(line, 16, "{message}");
    }

    #[test]
    fn unknown_fields_and_bad_types_name_their_line() {
        let (line, message) = refused(&GOOD.replace("rows = 3", "rows = 3\ncolour = 1"));
        assert_eq!(line, 5, "{message}");
        assert!(message.contains("colour"), "{message}");
        let (line, _) = refused(&GOOD.replace("max_price = 20", "max_price = \"cheap\""));
        assert_eq!(line, 8);
    }

    #[test]
    fn the_tier_is_interactive_or_batch() {
        assert_eq!(parse(GOOD).unwrap().tier, Tier::Interactive);
        let batch = parse(&GOOD.replace("rows = 3", "rows = 3\ntier = \"batch\"")).unwrap();
        assert_eq!(batch.tier, Tier::Batch);
        let (line, message) = refused(&GOOD.replace("rows = 3", "rows = 3\ntier = \"bulk\""));
        assert_eq!(line, 5, "{message}");
        assert!(message.contains("tier must be"), "{message}");
    }

    #[test]
    fn an_invalid_schema_names_its_line() {
        let text =
            format!("{GOOD}\n[output]\nformat = \"json\"\nschema = {{ type = \"strnig\" }}\n");
        let (line, message) = refused(&text);
        assert_eq!(line, 24, "{message}");
        assert!(message.contains("invalid JSON Schema"), "{message}");
    }

    #[test]
    fn a_missing_checker_names_its_line() {
        let text =
            format!("{GOOD}\n[filters]\nchecker = {{ run = \"sh\", script = \"nope.sh\" }}\n");
        let (line, message) = refused(&text);
        assert_eq!(line, 23, "{message}");
        assert!(message.contains("does not exist"), "{message}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok.sh"), "exit 0").unwrap();
        let text = format!("{GOOD}\n[filters]\nchecker = {{ run = \"no-such-interpreter-xyz\", script = \"ok.sh\" }}\n");
        match Spec::parse(&dir.path().join("spec.toml"), &text) {
            Err(Error::Spec {
                line: 23, message, ..
            }) => assert!(message.contains("not on the PATH"), "{message}"),
            other => panic!("{other:?}"),
        }
        let text = format!("{GOOD}\n[filters]\nchecker = {{ run = \"sh\", script = \"ok.sh\" }}\n");
        let s = Spec::parse(&dir.path().join("spec.toml"), &text).unwrap();
        assert!(s.filters.checker.unwrap().run.unwrap().ends_with("sh"));
    }

    #[test]
    fn bad_values_are_refused() {
        for (from, to, line) in [
            ("rows = 3", "rows = 0", 4),
            ("n = { range = [1, 3] }", "n = { range = [3, 1] }", 12),
            (
                "n = { range = [1, 3] }",
                "n = { file = \"missing.txt\" }",
                12,
            ),
            ("topic = [\"cats\", \"trains\"]", "topic = []", 11),
            ("name = \"answer\"", "name = \"topic\"", 19),
        ] {
            let (l, message) = refused(&GOOD.replace(from, to));
            assert_eq!(l, line, "{to}: {message}");
        }
    }

    #[test]
    fn seeds_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seeds.txt"), "alpha\n\n beta \n").unwrap();
        let text = GOOD.replace("n = { range = [1, 3] }", "n = { file = \"seeds.txt\" }");
        let s = Spec::parse(&dir.path().join("spec.toml"), &text).unwrap();
        assert_eq!(s.variables[0].values, vec!["alpha", "beta"]);
    }

    #[test]
    fn the_example_specs_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/synth");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(s.rows > 0 && !s.steps.is_empty());
                n += 1;
            }
        }
        assert!(n >= 4, "{n} example specs");
    }

    #[test]
    fn the_python_example_checker_runs_the_rows_tests() {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/synth/check_python.py");
        let check = |code: &str| {
            let row = serde_json::json!({"text": format!("```python\n{code}```"), "variables": {}});
            let mut child = std::process::Command::new("python3")
                .arg(&script)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("python3");
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), row.to_string().as_bytes())
                .unwrap();
            child.wait().unwrap().success()
        };
        let body = "def rev(s):\n    return s[::-1]\n";
        assert!(check(&format!(
            "{body}assert rev('ab') == 'ba'\nassert rev('') == ''\nassert rev('a') == 'a'\n"
        )));
        assert!(
            !check(&format!(
                "{body}assert rev('ab') == 'ab'\nassert rev('') == ''\nassert rev('a') == 'a'\n"
            )),
            "a failing assert"
        );
        assert!(
            !check(&format!("{body}assert rev('ab') == 'ba'\n")),
            "too few tests"
        );
        assert!(
            !check("def loop():\n    pass\nwhile True: pass\nassert 1\nassert 1\nassert 1\n"),
            "a hang is a reject"
        );
    }
}
