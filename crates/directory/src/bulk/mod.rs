//! Bulk import and export of recipients: the classic CSV format and LDIF (RFC 2849).
//!
//! Parsers stream: they yield one [`Row`] (a directory [`Change`] and the line it came
//! from) or one [`RowError`] (line, attribute, reason) at a time, so a file of any size
//! is read in constant memory. List memberships and owners are applied after every row
//! (the parser yields them last), so a file may name a list's members before or after the list, and
//! lists may contain each other; that is also what makes export followed by import work
//! whatever the order.
//!
//! Exporters write recipients sorted by alias, so the same directory always exports to
//! the same bytes. Passwords are never exported.

pub mod csv;
pub mod ldif;

use crate::writer::{Change, DirectoryError};
use std::fmt;
use std::path::Path;

/// A file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The classic directory CSV.
    Csv,
    /// LDIF, RFC 2849.
    Ldif,
}

impl Format {
    /// The format a file name implies (`.csv`, `.ldif`/`.ldf`).
    pub fn from_path(path: &Path) -> Option<Format> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        Format::parse(&extension)
    }

    /// Parses `csv` or `ldif`.
    pub fn parse(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "ldif" | "ldf" => Some(Format::Ldif),
            _ => None,
        }
    }
}

/// One change read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The line the record starts on (1-based).
    pub line: u64,
    /// The recipient's alias, for messages.
    pub alias: String,
    /// What to do.
    pub change: Change,
    /// True for the membership changes applied after every row.
    pub deferred: bool,
}

/// A row that cannot be imported: where, which attribute, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// The line (1-based) the record starts on.
    pub line: u64,
    /// The attribute at fault (empty when the whole record is).
    pub attribute: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attribute.is_empty() {
            write!(f, "line {}: {}", self.line, self.reason)
        } else {
            write!(
                f,
                "line {}: attribute {}: {}",
                self.line, self.attribute, self.reason
            )
        }
    }
}

/// The error a directory refusal gives for a row, naming the file's attribute.
pub fn row_error(row: &Row, error: &DirectoryError, format: Format) -> RowError {
    let (field, reason) = match error {
        DirectoryError::Invalid { field, reason, .. } => (*field, reason.clone()),
        other => ("", other.to_string()),
    };
    let attribute = match format {
        Format::Csv => csv::attribute_of(field),
        Format::Ldif => ldif::attribute_of(field),
    };
    RowError {
        line: row.line,
        attribute: attribute.to_string(),
        reason: format!("{}: {reason}", row.alias),
    }
}

/// Parses any format into rows.
pub fn parse<'a, R: std::io::Read + 'a>(
    format: Format,
    reader: R,
) -> Box<dyn Iterator<Item = Result<Row, RowError>> + 'a> {
    match format {
        Format::Csv => Box::new(csv::CsvRows::new(reader)),
        Format::Ldif => Box::new(ldif::LdifRows::new(reader)),
    }
}

/// Exports a snapshot in any format.
pub fn export(format: Format, snapshot: &crate::Snapshot) -> String {
    match format {
        Format::Csv => csv::export(snapshot),
        Format::Ldif => ldif::export(snapshot),
    }
}

/// Parses a boolean the way administrators write it.
pub(crate) fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        other => Err(format!("{other:?} is not TRUE or FALSE")),
    }
}

/// Parses a size in KB.
pub(crate) fn parse_kb(value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number of KB"))
}
