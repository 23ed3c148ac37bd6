//! The filters a finished row must pass: length, pattern, JSON Schema, and the checker command
//! (the row as JSON on stdin; exit status 0 accepts).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

use crate::spec::{Checker, Output, Spec};
use crate::store::{RejectReason, StepResult};
use crate::{Error, Result};

/// The JSON document in a model's answer: the text itself, or inside a Markdown code fence.
pub fn json_document(text: &str) -> Option<Value> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|rest| rest.trim_end().strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str(t.trim()).ok()
}

/// What a checker reads on stdin.
pub fn checker_input(
    variables: &std::collections::BTreeMap<String, String>,
    steps: &[StepResult],
) -> Value {
    let named: serde_json::Map<String, Value> = steps
        .iter()
        .map(|s| (s.name.clone(), Value::String(s.text.clone())))
        .collect();
    let text = steps.last().map_or("", |s| s.text.as_str());
    json!({"variables": variables, "steps": named, "text": text})
}

/// Judges a row: `Ok(None)` accepts, `Ok(Some(reason))` rejects; running the checker at all
/// failing is an error.
pub fn judge(spec: &Spec, input: &Value) -> Result<Option<RejectReason>> {
    let text = input["text"].as_str().unwrap_or("");
    let f = &spec.filters;
    let chars = text.chars().count();
    if f.min_chars.is_some_and(|n| chars < n) {
        return Ok(Some(RejectReason::TooShort));
    }
    if f.max_chars.is_some_and(|n| chars > n) {
        return Ok(Some(RejectReason::TooLong));
    }
    if f.regex.as_ref().is_some_and(|re| !re.is_match(text)) {
        return Ok(Some(RejectReason::NoMatch));
    }
    if let Output::Json { schema, .. } = &spec.output {
        let Some(doc) = json_document(text) else {
            return Ok(Some(RejectReason::NotJson));
        };
        if let Some(why) = schema.violation(&doc) {
            tracing::debug!(why, "schema violation");
            return Ok(Some(RejectReason::Schema));
        }
    }
    if let Some(checker) = &f.checker {
        return run_checker(checker, spec, input);
    }
    Ok(None)
}

fn run_checker(checker: &Checker, spec: &Spec, input: &Value) -> Result<Option<RejectReason>> {
    let mut cmd = match &checker.run {
        Some(interpreter) => {
            let mut c = Command::new(interpreter);
            c.arg(&checker.script);
            c
        }
        None => Command::new(&checker.script),
    };
    if let Some(dir) = spec.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.current_dir(dir);
    }
    let context = || format!("running the checker {}", checker.script.display());
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(Error::io(context()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A checker that exits without reading all of its input has still decided.
        let _ = stdin.write_all(input.to_string().as_bytes());
    }
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(Error::io(context()))? {
            return Ok((!status.success()).then_some(RejectReason::Checker));
        }
        if started.elapsed() > checker.timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Some(RejectReason::CheckerTimeout));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(dir: &Path, extra: &str) -> Spec {
        let text = format!(
            "name = \"t\"\nmodel = \"m\"\nrows = 1\n[budget]\nmax_spend = 9\nmax_price = 1\n[[steps]]\nname = \"out\"\nprompt = \"hi\"\n{extra}"
        );
        Spec::parse(&dir.join("spec.toml"), &text).unwrap()
    }

    fn input(text: &str) -> Value {
        json!({"variables": {}, "steps": {"out": text}, "text": text})
    }

    #[test]
    fn length_and_pattern_filters() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            dir.path(),
            "[filters]\nmin_chars = 3\nmax_chars = 10\nregex = '\\d'\n",
        );
        assert_eq!(
            judge(&s, &input("ab")).unwrap(),
            Some(RejectReason::TooShort)
        );
        assert_eq!(
            judge(&s, &input("abcdefghijk1")).unwrap(),
            Some(RejectReason::TooLong)
        );
        assert_eq!(
            judge(&s, &input("abcd")).unwrap(),
            Some(RejectReason::NoMatch)
        );
        assert_eq!(judge(&s, &input("abc 4")).unwrap(), None);
    }

    #[test]
    fn schema_filter_reads_plain_and_fenced_json() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            dir.path(),
            "[output]\nformat = \"json\"\nschema = { type = \"object\", required = [\"label\"] }\n",
        );
        assert_eq!(judge(&s, &input("{\"label\": 1}")).unwrap(), None);
        assert_eq!(
            judge(&s, &input("```json\n{\"label\": 1}\n```")).unwrap(),
            None
        );
        assert_eq!(
            judge(&s, &input("{\"x\": 1}")).unwrap(),
            Some(RejectReason::Schema)
        );
        assert_eq!(
            judge(&s, &input("label: 1")).unwrap(),
            Some(RejectReason::NotJson)
        );
    }

    #[test]
    fn the_checker_decides_by_exit_status_and_reads_the_row() {
        let dir = tempfile::tempdir().unwrap();
        // Accepts rows whose JSON on stdin mentions "42".
        std::fs::write(dir.path().join("check.sh"), "grep -q 42\n").unwrap();
        std::fs::write(dir.path().join("slow.sh"), "sleep 5\n").unwrap();
        let s = spec(
            dir.path(),
            "[filters]\nchecker = { run = \"sh\", script = \"check.sh\" }\n",
        );
        assert_eq!(judge(&s, &input("the answer is 42")).unwrap(), None);
        assert_eq!(
            judge(&s, &input("the answer is 41")).unwrap(),
            Some(RejectReason::Checker)
        );
        let s = spec(
            dir.path(),
            "[filters]\nchecker = { run = \"sh\", script = \"slow.sh\", timeout_secs = 1 }\n",
        );
        assert_eq!(
            judge(&s, &input("x")).unwrap(),
            Some(RejectReason::CheckerTimeout)
        );
    }
}
