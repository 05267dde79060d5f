//! Output: tables for people, `--output json` for scripts. Every printable answer is a list
//! of rows of named values, so both forms show the same fields. Times (fields named `at` or
//! `…_at`) are RFC 3339 in JSON and relative ("3s ago") in tables.

use comfy_table::{Table, presets::NOTHING};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// One record: field names and values, in display order.
pub type Row = Vec<(&'static str, Value)>;

/// `s` with every control character (C0, DEL, C1) replaced by a space: text from auraed,
/// a tenant or a registry never drives the operator's terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whether field `key` holds a time (RFC 3339 in JSON, relative in tables).
fn is_time(key: &str) -> bool {
    key == "at" || key.ends_with("_at")
}

fn cell_text(key: &str, v: &Value, now: f64) -> String {
    match v {
        Value::String(s) if is_time(key) => crate::time::parse_rfc3339(s)
            .map_or_else(|| s.clone(), |at| crate::time::relative(at, now)),
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(a) => a
            .iter()
            .map(|v| cell_text(key, v, now))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// Prints rows: a table with one column per field, or a JSON array (a single object when
/// `single`).
pub fn print(format: Format, rows: &[Row], single: bool) {
    match format {
        Format::Json => {
            let objs: Vec<Value> = rows
                .iter()
                .map(|r| {
                    Value::Object(
                        r.iter()
                            .map(|(k, v)| ((*k).to_owned(), v.clone()))
                            .collect::<Map<_, _>>(),
                    )
                })
                .collect();
            let out = match (single, objs.as_slice()) {
                (true, [one]) => one.clone(),
                _ => Value::Array(objs),
            };
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Format::Table => {
            let Some(first) = rows.first() else {
                println!("(none)");
                return;
            };
            let now = crate::time::now();
            let mut t = Table::new();
            t.load_style(NOTHING);
            if single {
                t.set_header(vec!["FIELD", "VALUE"]);
                for (k, v) in first {
                    t.add_row(vec![k.to_uppercase(), cell_text(k, v, now)]);
                }
            } else {
                t.set_header(
                    first
                        .iter()
                        .map(|(k, _)| k.to_uppercase())
                        .collect::<Vec<_>>(),
                );
                for r in rows {
                    t.add_row(
                        r.iter()
                            .map(|(k, v)| cell_text(k, v, now))
                            .collect::<Vec<_>>(),
                    );
                }
            }
            println!("{t}");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_show_times_relative_and_keep_other_strings() {
        let at = json!(crate::time::rfc3339(100, 0));
        assert_eq!(cell_text("started_at", &at, 103.5), "3s ago");
        assert_eq!(cell_text("at", &at, 160.0), "60s ago");
        assert_eq!(cell_text("svid_expires_at", &at, 40.0), "in 60s");
        // Not a time field, or not our format: shown as it is.
        assert_eq!(cell_text("name", &at, 103.5), "1970-01-01T00:01:40.000Z");
        assert_eq!(cell_text("created_at", &json!("soon"), 0.0), "soon");
        assert_eq!(cell_text("created_at", &Value::Null, 0.0), "");
    }
}
