//! A JSON Schema subset (draft 2020-12 keywords: `type`, `enum`, `const`, `properties`,
//! `required`, `additionalProperties`, `items`, `minItems`, `maxItems`, `minLength`,
//! `maxLength`, `pattern`, `minimum`, `maximum`; annotations are ignored). Written here rather
//! than taking the `jsonschema` crate, whose dependency tree (a regex engine with
//! backtracking, URL and e-mail parsers, an HTTP resolver) outweighs what a dataset filter
//! needs. A keyword outside the subset is refused when the spec is read, never ignored, so a
//! schema is never checked less strictly than it says.

use serde_json::Value;

const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
];
const TYPES: &[&str] = &[
    "null", "boolean", "object", "array", "number", "integer", "string",
];

/// A checked schema.
#[derive(Debug, Clone)]
pub struct Schema {
    root: Value,
}

impl Schema {
    /// Checks that `schema` uses only the supported keywords, correctly.
    pub fn compile(schema: Value) -> Result<Self, String> {
        check(&schema, "#")?;
        Ok(Self { root: schema })
    }

    /// The schema as JSON (for `response_format`).
    pub fn as_json(&self) -> &Value {
        &self.root
    }

    /// Why `value` does not conform, or `None` when it does.
    pub fn violation(&self, value: &Value) -> Option<String> {
        validate(&self.root, value, "$").err()
    }
}

fn check(s: &Value, at: &str) -> Result<(), String> {
    let Value::Object(map) = s else {
        return match s {
            Value::Bool(_) => Ok(()),
            _ => Err(format!("{at}: a schema must be an object or a boolean")),
        };
    };
    for (k, v) in map {
        let here = format!("{at}/{k}");
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                for n in names {
                    if !n.as_str().is_some_and(|n| TYPES.contains(&n)) {
                        return Err(format!("{here}: unknown type {n}"));
                    }
                }
            }
            "enum" if !v.is_array() => return Err(format!("{here}: must be an array")),
            "enum" | "const" => {}
            "properties" => {
                let Value::Object(props) = v else {
                    return Err(format!("{here}: must be an object"));
                };
                for (name, sub) in props {
                    check(sub, &format!("{here}/{name}"))?;
                }
            }
            "required" => {
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return Err(format!("{here}: must be an array of names"));
                }
            }
            "additionalProperties" | "items" => check(v, &here)?,
            "minItems" | "maxItems" | "minLength" | "maxLength" => {
                if v.as_u64().is_none() {
                    return Err(format!("{here}: must be a non-negative integer"));
                }
            }
            "minimum" | "maximum" => {
                if !v.is_number() {
                    return Err(format!("{here}: must be a number"));
                }
            }
            "pattern" => {
                let p = v.as_str().ok_or(format!("{here}: must be a string"))?;
                regex::Regex::new(p).map_err(|e| format!("{here}: {e}"))?;
            }
            a if ANNOTATIONS.contains(&a) => {}
            other => return Err(format!("{here}: keyword `{other}` is not supported")),
        }
    }
    Ok(())
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
    }
}

fn validate(s: &Value, v: &Value, at: &str) -> Result<(), String> {
    let map = match s {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: not allowed")),
        Value::Object(map) => map,
        _ => return Ok(()),
    };
    if let Some(t) = map.get("type") {
        let actual = type_of(v);
        let fits = |name: &Value| {
            let name = name.as_str().unwrap_or("");
            name == actual || (name == "number" && actual == "integer")
        };
        let ok = match t {
            Value::Array(a) => a.iter().any(fits),
            one => fits(one),
        };
        if !ok {
            return Err(format!("{at}: expected {t}, got {actual}"));
        }
    }
    if let Some(Value::Array(options)) = map.get("enum") {
        if !options.contains(v) {
            return Err(format!(
                "{at}: {v} is not one of {}",
                Value::Array(options.clone())
            ));
        }
    }
    if let Some(c) = map.get("const") {
        if c != v {
            return Err(format!("{at}: expected {c}"));
        }
    }
    let bound = |key: &str| map.get(key).and_then(Value::as_u64);
    match v {
        Value::Object(obj) => {
            if let Some(Value::Array(required)) = map.get("required") {
                for r in required.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        return Err(format!("{at}: missing property `{r}`"));
                    }
                }
            }
            let props = map.get("properties").and_then(Value::as_object);
            for (k, value) in obj {
                let here = format!("{at}.{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(sub) => validate(sub, value, &here)?,
                    None => {
                        if let Some(extra) = map.get("additionalProperties") {
                            validate(extra, value, &here)?;
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if bound("minItems").is_some_and(|n| (items.len() as u64) < n) {
                return Err(format!("{at}: fewer than {} items", map["minItems"]));
            }
            if bound("maxItems").is_some_and(|n| (items.len() as u64) > n) {
                return Err(format!("{at}: more than {} items", map["maxItems"]));
            }
            if let Some(sub) = map.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(sub, item, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            if bound("minLength").is_some_and(|n| chars < n) {
                return Err(format!("{at}: shorter than {}", map["minLength"]));
            }
            if bound("maxLength").is_some_and(|n| chars > n) {
                return Err(format!("{at}: longer than {}", map["maxLength"]));
            }
            if let Some(p) = map.get("pattern").and_then(Value::as_str) {
                // Compiled when the schema was checked, so this cannot fail.
                if regex::Regex::new(p).is_ok_and(|re| !re.is_match(text)) {
                    return Err(format!("{at}: does not match /{p}/"));
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = map.get("minimum").and_then(Value::as_f64) {
                if x < min {
                    return Err(format!("{at}: below the minimum {min}"));
                }
            }
            if let Some(max) = map.get("maximum").and_then(Value::as_f64) {
                if x > max {
                    return Err(format!("{at}: above the maximum {max}"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn label_schema() -> Schema {
        Schema::compile(json!({
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": ["positive", "negative"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}
            },
            "required": ["label"],
            "additionalProperties": false
        }))
        .unwrap()
    }

    #[test]
    fn conforming_values_pass() {
        let s = label_schema();
        assert_eq!(s.violation(&json!({"label": "positive"})), None);
        assert_eq!(
            s.violation(&json!({"label": "negative", "confidence": 1, "tags": ["a"]})),
            None
        );
    }

    #[test]
    fn violations_name_the_place() {
        let s = label_schema();
        let cases = [
            (json!({"confidence": 0.5}), "missing property `label`"),
            (json!({"label": "meh"}), "$.label"),
            (
                json!({"label": "positive", "extra": 1}),
                "$.extra: not allowed",
            ),
            (
                json!({"label": "positive", "confidence": 2}),
                "above the maximum",
            ),
            (
                json!({"label": "positive", "tags": ["toolongatag"]}),
                "$.tags[0]",
            ),
            (json!([1]), "expected \"object\""),
        ];
        for (value, expected) in cases {
            let v = s.violation(&value).unwrap_or_default();
            assert!(v.contains(expected), "{value}: {v}");
        }
    }

    #[test]
    fn unsupported_or_malformed_schemas_are_refused() {
        for bad in [
            json!({"type": "strnig"}),
            json!({"oneOf": [{"type": "string"}]}),
            json!({"pattern": "("}),
            json!({"required": "label"}),
            json!(3),
        ] {
            assert!(Schema::compile(bad.clone()).is_err(), "{bad}");
        }
    }
}
