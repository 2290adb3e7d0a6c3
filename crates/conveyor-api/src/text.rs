//! The Prometheus text format's primitives, shared by [`crate::metrics`] and
//! [`crate::recorded`].

use std::fmt::Write;

/// Appends one metric family with a single unlabelled sample.
pub fn render_value(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// A label value as the text format writes it (backslash, quote and newline escaped).
pub(crate) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
