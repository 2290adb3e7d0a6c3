//! Reading a sink's settings, one wording for every sink: a `[sinks.NAME]` table of the config
//! file (TOML values), or a quick form's query keys (strings), both as a JSON object.

use std::ops::RangeInclusive;

use serde_json::{Map, Value};

/// A sink's settings table, its keys checked against the ones the sink knows.
pub struct Settings<'a> {
    kind: &'a str,
    table: &'a Map<String, Value>,
}

/// A quick form's query string (`?table=events&timeout_ms=500`) as a settings table of
/// strings; `refuse` names a key the quick form takes elsewhere (its host or path), with why.
pub fn query_table(
    query: &str,
    refuse: impl Fn(&str) -> Option<String>,
) -> Result<Map<String, Value>, String> {
    let mut table = Map::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if let Some(why) = refuse(&key) {
            return Err(why);
        }
        table.insert(key.into_owned(), Value::String(value.into_owned()));
    }
    Ok(table)
}

impl<'a> Settings<'a> {
    /// Refuses a key not in `known` (`type` is always allowed) by name, listing the known ones.
    pub fn new(
        kind: &'a str,
        table: &'a Map<String, Value>,
        known: &[&str],
    ) -> Result<Self, String> {
        if let Some(unknown) = table
            .keys()
            .find(|k| k.as_str() != "type" && !known.contains(&k.as_str()))
        {
            return Err(if known.is_empty() {
                format!("a {kind} sink has no settings (`{unknown}` given)")
            } else {
                format!(
                    "a {kind} sink has no setting `{unknown}` (settings: {})",
                    known.join(", ")
                )
            });
        }
        Ok(Settings { kind, table })
    }

    /// The value as text: a string as it is, any other value as JSON (`5`, `true`).
    pub fn text(&self, key: &str) -> Option<String> {
        self.table.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    /// A setting the sink cannot do without; `example` shows what it looks like.
    pub fn required(&self, key: &str, example: &str) -> Result<String, String> {
        self.text(key)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("a {} sink needs `{key}` ({example})", self.kind))
    }

    pub fn boolean(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.text(key).as_deref() {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(format!("{key} is true or false, not '{other}'")),
        }
    }

    /// A whole number inside `range`.
    pub fn number(
        &self,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<u64, String> {
        match self.text(key) {
            None => Ok(default),
            Some(n) => n
                .parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or(format!(
                    "{key} is a whole number from {} to {}, not '{n}'",
                    range.start(),
                    range.end()
                )),
        }
    }

    /// One of `choices`, as written.
    pub fn choice(
        &self,
        key: &str,
        choices: &[&'static str],
    ) -> Result<Option<&'static str>, String> {
        match self.text(key) {
            None => Ok(None),
            Some(value) => choices
                .iter()
                .find(|c| **c == value)
                .map(|c| Some(*c))
                .ok_or(format!(
                    "{key} is one of {}, not '{value}'",
                    choices.join(", ")
                )),
        }
    }

    /// A table's entries, each value as given (`columns = { customer = ".data.customer.id" }`),
    /// in key order.
    pub fn entries(&self, key: &str) -> Result<Vec<(String, Value)>, String> {
        match self.table.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(entries)) => Ok(entries
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()),
            Some(other) => Err(format!("{key} is a table, not {other}")),
        }
    }

    /// A table of strings (`headers = { "x-team" = "data" }`), in key order.
    pub fn strings(&self, key: &str) -> Result<Vec<(String, String)>, String> {
        match self.table.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(entries)) => entries
                .iter()
                .map(|(name, value)| match value {
                    Value::String(s) => Ok((name.clone(), s.clone())),
                    other => Err(format!("{key}.{name} is a string, not {other}")),
                })
                .collect(),
            Some(other) => Err(format!("{key} is a table of strings, not {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn each_setting_is_read_or_refused_by_name() {
        let t = table(serde_json::json!({
            "type": "x", "n": 5, "s": "7", "b": "false", "e": "array",
            "h": {"x-a": "1"}, "bad": {"x": 1}
        }));
        let s = Settings::new("test", &t, &["n", "s", "b", "e", "h", "bad"]).expect("known");
        assert_eq!(s.number("n", 1, 1..=10), Ok(5));
        assert_eq!(s.number("s", 1, 1..=10), Ok(7));
        assert_eq!(s.number("missing", 3, 1..=10), Ok(3));
        assert_eq!(
            s.number("n", 1, 6..=10),
            Err("n is a whole number from 6 to 10, not '5'".into())
        );
        assert_eq!(s.boolean("b", true), Ok(false));
        assert_eq!(s.choice("e", &["event", "array"]), Ok(Some("array")));
        assert_eq!(
            s.choice("s", &["event", "array"]),
            Err("s is one of event, array, not '7'".into())
        );
        assert_eq!(s.strings("h"), Ok(vec![("x-a".into(), "1".into())]));
        assert_eq!(s.strings("bad"), Err("bad.x is a string, not 1".into()));
        assert_eq!(
            s.required("url", "http://host/path"),
            Err("a test sink needs `url` (http://host/path)".into())
        );
        let unknown = Settings::new("test", &t, &["n"]).err().unwrap_or_default();
        assert_eq!(unknown, "a test sink has no setting `b` (settings: n)");
        let none = Settings::new("stdout", &t, &[]).err().unwrap_or_default();
        assert_eq!(none, "a stdout sink has no settings (`b` given)");
    }
}
