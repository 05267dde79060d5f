//! Output: tables for people, `--output json` for scripts. Every printable answer is a list
//! of rows of named values, so both forms show the same fields.

use comfy_table::{Table, presets::NOTHING};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// One record: field names and values, in display order.
pub type Row = Vec<(&'static str, Value)>;

fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(a) => a.iter().map(cell_text).collect::<Vec<_>>().join(", "),
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
            let mut t = Table::new();
            t.load_style(NOTHING);
            if single {
                t.set_header(vec!["FIELD", "VALUE"]);
                for (k, v) in first {
                    t.add_row(vec![k.to_uppercase(), cell_text(v)]);
                }
            } else {
                t.set_header(
                    first
                        .iter()
                        .map(|(k, _)| k.to_uppercase())
                        .collect::<Vec<_>>(),
                );
                for r in rows {
                    t.add_row(r.iter().map(|(_, v)| cell_text(v)).collect::<Vec<_>>());
                }
            }
            println!("{t}");
        }
    }
}
