//! The classic directory CSV format.
//!
//! A header row names the attributes: `Obj-Class` first (`Mailbox`, `Remote`, `dl`), an
//! optional `Mode` second (`Create`, `Modify`, `Delete`, `Update`; default `Update`, which
//! creates or modifies), then any of the attributes in [`ATTRIBUTES`] in any order.
//! Multi-valued fields separate values with `%`; `~DEL` clears a field; an empty field
//! leaves it as it is. `E-mail Addresses` uses the classic proxy convention: `SMTP:` (upper
//! case) marks the primary address, `smtp:` a secondary one. A mailbox without an SMTP
//! address gets one from site addressing.

use super::{Row, RowError, parse_bool, parse_kb};
use crate::Snapshot;
use crate::model::{Recipient, RecipientKind};
use crate::writer::{Change, RecipientFields};
use std::collections::VecDeque;
use std::io::Read;

/// The attributes this format knows, as they appear in a header (case-insensitive).
pub const ATTRIBUTES: [&str; 14] = [
    "Directory Name",
    "Display Name",
    "First Name",
    "Last Name",
    "Initials",
    "E-mail Addresses",
    "Target Address",
    "Members",
    "Owner",
    "Hide From Address Book",
    "Protocol Settings",
    "Quota Warning",
    "Quota Prohibit Send",
    "Quota Prohibit Send Receive",
];

/// The marker that clears a field.
pub const DELETE_MARKER: &str = "~DEL";

/// The CSV attribute behind a directory field name (for error messages).
pub fn attribute_of(field: &str) -> &'static str {
    match field {
        "alias" => "Directory Name",
        "display_name" => "Display Name",
        "given_name" => "First Name",
        "surname" => "Last Name",
        "initials" => "Initials",
        "addresses" | "address" | "secondary_addresses" => "E-mail Addresses",
        "target_address" => "Target Address",
        "members" => "Members",
        "owner" => "Owner",
        "protocols" => "Protocol Settings",
        "kind" => "Obj-Class",
        "password" => "Directory Name",
        _ => "",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Modify,
    Delete,
    Update,
}

/// Longest record (one row, quoted newlines included), in bytes. A missing closing quote
/// would otherwise make the rest of the file one record held in memory.
pub const RECORD_BYTES_MAX: usize = 1 << 20;

/// Streams rows out of a CSV file; see the module documentation.
pub struct CsvRows<R: Read> {
    /// Physical lines; records are gathered from them so that every record knows the
    /// line it starts on (the `csv` crate's positions count CRLF and blank lines oddly).
    lines: std::io::BufReader<R>,
    /// One CSV parser for the whole file, reset per record (a `csv::Reader` built per
    /// record rebuilt its state machine and buffers every time: 4 % of the churn
    /// server's samples, bench/profile).
    parser: csv_core::Reader,
    line: u64,
    header: Option<Vec<String>>,
    has_mode: bool,
    deferred: Vec<Row>,
    pending: VecDeque<Result<Row, RowError>>,
    finished: bool,
}

impl<R: Read> CsvRows<R> {
    /// Reads CSV from `reader`.
    pub fn new(reader: R) -> CsvRows<R> {
        CsvRows {
            lines: std::io::BufReader::new(reader),
            parser: csv_core::Reader::new(),
            line: 0,
            header: None,
            has_mode: false,
            deferred: Vec::new(),
            pending: VecDeque::new(),
            finished: false,
        }
    }

    /// The next record and the line it starts on; `None` at the end.
    fn read_record(&mut self) -> Option<Result<(u64, csv::StringRecord), RowError>> {
        use std::io::BufRead;
        let mut text = Vec::new();
        let start = self.line + 1;
        // Quotes counted so far: each line is scanned once (counting the whole record
        // again per line made an unterminated quote quadratic in the file's size).
        let mut quotes = 0usize;
        loop {
            let before = text.len();
            match self.lines.read_until(b'\n', &mut text) {
                Ok(0) if text.is_empty() => return None,
                Ok(0) => break,
                Ok(_) => self.line += 1,
                Err(e) => {
                    return Some(Err(RowError {
                        line: self.line + 1,
                        attribute: String::new(),
                        reason: format!("unreadable line: {e}"),
                    }));
                }
            }
            // A record ends at a newline outside quotes (RFC 4180 fields may hold newlines).
            quotes += memchr::memchr_iter(b'"', &text[before..]).count();
            if quotes.is_multiple_of(2) || text.len() == before {
                break;
            }
            if text.len() > RECORD_BYTES_MAX {
                return Some(Err(RowError {
                    line: start,
                    attribute: String::new(),
                    reason: format!(
                        "unreadable CSV: a quoted field opened here is still open after {RECORD_BYTES_MAX} bytes (a missing closing quote?)"
                    ),
                }));
            }
        }
        Some(
            self.split(&text)
                .map(|record| (start, record))
                .map_err(|reason| RowError {
                    line: start,
                    attribute: String::new(),
                    reason: format!("unreadable CSV: {reason}"),
                }),
        )
    }

    /// One record's fields (none for a blank line).
    fn split(&mut self, text: &[u8]) -> Result<csv::StringRecord, String> {
        use csv_core::ReadRecordResult;
        self.parser.reset();
        // Unquoting only shortens, and a record has at most one field more than it has
        // bytes: the buffers cannot fill.
        let mut out = vec![0u8; text.len() + 1];
        let mut ends = vec![0usize; text.len() + 2];
        let (mut read, mut written, mut fields) = (0, 0, 0);
        loop {
            let (result, r, w, f) =
                self.parser
                    .read_record(&text[read..], &mut out[written..], &mut ends[fields..]);
            read += r;
            written += w;
            fields += f;
            match result {
                ReadRecordResult::Record => break,
                ReadRecordResult::End => return Ok(csv::StringRecord::new()),
                // All of `text` was given; an empty input now tells the parser it ended.
                ReadRecordResult::InputEmpty => {}
                ReadRecordResult::OutputFull | ReadRecordResult::OutputEndsFull => {
                    return Err("a record larger than its own text".into());
                }
            }
        }
        let mut record = csv::StringRecord::with_capacity(written, fields);
        let mut from = 0;
        for (n, &end) in ends[..fields].iter().enumerate() {
            let field = std::str::from_utf8(&out[from..end])
                .map_err(|e| format!("field {} is not UTF-8 ({e})", n + 1))?;
            record.push_field(field);
            from = end;
        }
        Ok(record)
    }

    fn read_header(&mut self) -> Result<Vec<String>, RowError> {
        let bad = |reason: String| RowError {
            line: 1,
            attribute: String::new(),
            reason,
        };
        let record = match self.read_record() {
            Some(Ok((_, record))) => record,
            None => return Err(bad("the file is empty; it needs a header row".into())),
            Some(Err(e)) => return Err(bad(format!("cannot read the header: {}", e.reason))),
        };
        let names: Vec<String> = record.iter().map(|f| f.trim().to_string()).collect();
        if !names
            .first()
            .is_some_and(|n| n.eq_ignore_ascii_case("Obj-Class"))
        {
            return Err(bad("the first column must be Obj-Class".into()));
        }
        self.has_mode = names.get(1).is_some_and(|n| n.eq_ignore_ascii_case("Mode"));
        let first_attribute = if self.has_mode { 2 } else { 1 };
        let mut seen = Vec::new();
        for name in &names[first_attribute..] {
            let Some(known) = ATTRIBUTES.iter().find(|a| a.eq_ignore_ascii_case(name)) else {
                return Err(RowError {
                    line: 1,
                    attribute: name.clone(),
                    reason: format!(
                        "unknown attribute (known: Obj-Class, Mode, {})",
                        ATTRIBUTES.join(", ")
                    ),
                });
            };
            if seen.contains(known) {
                return Err(RowError {
                    line: 1,
                    attribute: name.clone(),
                    reason: "appears twice in the header".into(),
                });
            }
            seen.push(known);
        }
        if !seen.contains(&"Directory Name") {
            return Err(bad(
                "the header has no Directory Name column (the key of every row)".into(),
            ));
        }
        Ok(names)
    }

    fn row(
        &mut self,
        line: u64,
        header: &[String],
        record: &csv::StringRecord,
    ) -> Result<Vec<Row>, RowError> {
        let err = |attribute: &str, reason: String| RowError {
            line,
            attribute: attribute.to_string(),
            reason,
        };
        if record.len() != header.len() {
            return Err(err(
                "",
                format!(
                    "expected {} fields like the header, found {}",
                    header.len(),
                    record.len()
                ),
            ));
        }
        let kind = RecipientKind::from_obj_class(&record[0]).ok_or_else(|| {
            err(
                "Obj-Class",
                format!("{:?} is not Mailbox, Remote or dl", &record[0]),
            )
        })?;
        let mode = if self.has_mode {
            match record[1].trim().to_ascii_lowercase().as_str() {
                "" | "update" => Mode::Update,
                "create" => Mode::Create,
                "modify" => Mode::Modify,
                "delete" => Mode::Delete,
                other => {
                    return Err(err(
                        "Mode",
                        format!("{other:?} is not Create, Modify, Delete or Update"),
                    ));
                }
            }
        } else {
            Mode::Update
        };
        let mut fields = RecipientFields {
            kind: Some(kind),
            ..RecipientFields::default()
        };
        let mut alias = String::new();
        let mut members = None;
        let mut owner = None;
        for (name, value) in
            header
                .iter()
                .zip(record.iter())
                .skip(if self.has_mode { 2 } else { 1 })
        {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            let clear = value == super::csv::DELETE_MARKER;
            let text = || {
                Some(if clear {
                    String::new()
                } else {
                    value.to_string()
                })
            };
            let list = || {
                Some(if clear {
                    Vec::new()
                } else {
                    value
                        .split('%')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect()
                })
            };
            let kb = || -> Result<Option<u64>, RowError> {
                if clear {
                    return Ok(Some(0));
                }
                parse_kb(value).map(Some).map_err(|r| err(name, r))
            };
            match name.to_ascii_lowercase().as_str() {
                "directory name" => {
                    if clear {
                        return Err(err(name, "the key cannot be cleared".into()));
                    }
                    alias = value.to_string();
                    fields.alias = Some(alias.clone());
                }
                "display name" => fields.display_name = text(),
                "first name" => fields.given_name = text(),
                "last name" => fields.surname = text(),
                "initials" => fields.initials = text(),
                "e-mail addresses" => fields.addresses = list(),
                "target address" => fields.target_address = text(),
                "members" => members = list(),
                "owner" => owner = text(),
                "hide from address book" => {
                    fields.hidden = Some(if clear {
                        false
                    } else {
                        parse_bool(value).map_err(|r| err(name, r))?
                    })
                }
                "protocol settings" => fields.protocols = list(),
                "quota warning" => fields.quota_warning_kb = kb()?,
                "quota prohibit send" => fields.quota_prohibit_send_kb = kb()?,
                "quota prohibit send receive" => fields.quota_prohibit_send_receive_kb = kb()?,
                _ => unreachable!("the header was checked"),
            }
        }
        if alias.is_empty() {
            return Err(err(
                "Directory Name",
                "is empty; every row needs its key".into(),
            ));
        }
        let change = match mode {
            Mode::Create => Change::CreateRecipient(fields),
            Mode::Update => Change::UpsertRecipient(fields),
            Mode::Modify => Change::ModifyRecipient {
                alias: alias.clone(),
                fields,
            },
            Mode::Delete => {
                return Ok(vec![Row {
                    line,
                    alias: alias.clone(),
                    change: Change::DeleteRecipient { alias },
                    deferred: false,
                }]);
            }
        };
        let rows = vec![Row {
            line,
            alias: alias.clone(),
            change,
            deferred: false,
        }];
        if members.is_some() || owner.is_some() {
            self.deferred.push(Row {
                line,
                alias: alias.clone(),
                change: Change::ModifyRecipient {
                    alias,
                    fields: RecipientFields {
                        members,
                        owner,
                        ..RecipientFields::default()
                    },
                },
                deferred: true,
            });
        }
        Ok(rows)
    }
}

impl<R: Read> Iterator for CsvRows<R> {
    type Item = Result<Row, RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(item) = self.pending.pop_front() {
            return Some(item);
        }
        if self.finished {
            return None;
        }
        if self.header.is_none() {
            match self.read_header() {
                Ok(header) => self.header = Some(header),
                Err(e) => {
                    self.finished = true;
                    return Some(Err(e));
                }
            }
        }
        let header = self.header.take().expect("read above");
        let item = self.next_row(&header);
        self.header = Some(header);
        item
    }
}

impl<R: Read> CsvRows<R> {
    fn next_row(&mut self, header: &[String]) -> Option<Result<Row, RowError>> {
        loop {
            match self.read_record() {
                Some(Ok((line, record))) => {
                    if record.iter().all(|f| f.trim().is_empty()) {
                        continue; // blank line
                    }
                    return match self.row(line, header, &record) {
                        Ok(rows) => {
                            self.pending.extend(rows.into_iter().map(Ok));
                            self.pending.pop_front()
                        }
                        Err(e) => Some(Err(e)),
                    };
                }
                None => {
                    self.finished = true;
                    self.pending
                        .extend(std::mem::take(&mut self.deferred).into_iter().map(Ok));
                    return self.pending.pop_front();
                }
                Some(Err(e)) => return Some(Err(e)),
            }
        }
    }
}

fn kb(value: Option<u64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn addresses(r: &Recipient) -> String {
    let mut out: Vec<String> = Vec::with_capacity(r.addresses.len());
    if let Some(primary) = r.primary_address() {
        out.push(format!("SMTP:{primary}"));
    }
    out.extend(
        r.addresses
            .iter()
            .filter(|a| !a.primary)
            .map(|a| format!("smtp:{}", a.address)),
    );
    out.join("%")
}

/// Exports every recipient, sorted by alias.
pub fn export(snapshot: &Snapshot) -> String {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let mut header = vec!["Obj-Class"];
    header.extend(ATTRIBUTES);
    writer.write_record(&header).expect("writing to memory");
    let alias_of = |id: i64| {
        snapshot
            .recipient(id)
            .map(|m| m.alias.clone())
            .unwrap_or_default()
    };
    for r in snapshot.recipients_by_alias() {
        let members: Vec<String> = r.members.iter().map(|m| alias_of(*m)).collect();
        let record = [
            r.kind.obj_class().to_string(),
            r.alias.clone(),
            r.display_name.clone(),
            r.given_name.clone(),
            r.surname.clone(),
            r.initials.clone(),
            addresses(&r),
            r.target_address
                .as_ref()
                .map(|t| format!("SMTP:{t}"))
                .unwrap_or_default(),
            members.join("%"),
            r.owner.map(alias_of).unwrap_or_default(),
            if r.hidden {
                "TRUE".into()
            } else {
                String::new()
            },
            r.protocols.to_csv().join("%"),
            kb(r.quota.warning_kb),
            kb(r.quota.prohibit_send_kb),
            kb(r.quota.prohibit_send_receive_kb),
        ];
        writer.write_record(&record).expect("writing to memory");
    }
    String::from_utf8(writer.into_inner().expect("flushing memory"))
        .expect("CSV of strings is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Result<Row, RowError>> {
        CsvRows::new(text.as_bytes()).collect()
    }

    #[test]
    fn rows_become_changes_with_lines_and_deferred_members() {
        let rows = parse(
            "Obj-Class,Mode,Directory Name,Display Name,E-mail Addresses,Members,Quota Warning\r\n\
             dl,Create,team,Team,SMTP:team@x.test,ann%bob,\r\n\
             Mailbox,,ann,Ann,SMTP:ann@x.test%smtp:a@x.test,,1000\r\n\
             \r\n\
             Mailbox,Modify,bob,~DEL,,,~DEL\r\n\
             Remote,Delete,old,,,,\r\n",
        );
        let rows: Vec<Row> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            rows.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 3, 5, 6, 2]
        );
        assert!(
            matches!(&rows[0].change, Change::CreateRecipient(f) if f.members.is_none() && f.kind == Some(RecipientKind::List))
        );
        let Change::UpsertRecipient(ann) = &rows[1].change else {
            panic!("{:?}", rows[1])
        };
        assert_eq!(
            ann.addresses.as_deref(),
            Some(&["SMTP:ann@x.test".to_string(), "smtp:a@x.test".to_string()][..])
        );
        assert_eq!(ann.quota_warning_kb, Some(1000));
        let Change::ModifyRecipient { alias, fields } = &rows[2].change else {
            panic!()
        };
        assert_eq!(alias, "bob");
        assert_eq!(fields.display_name.as_deref(), Some(""), "~DEL clears");
        assert_eq!(fields.quota_warning_kb, Some(0));
        assert_eq!(fields.addresses, None, "empty leaves as is");
        assert!(matches!(&rows[3].change, Change::DeleteRecipient { alias } if alias == "old"));
        assert!(rows[4].deferred);
        let Change::ModifyRecipient { fields, .. } = &rows[4].change else {
            panic!()
        };
        assert_eq!(
            fields.members.as_deref(),
            Some(&["ann".to_string(), "bob".to_string()][..])
        );
    }

    #[test]
    fn quoting_multiline_fields_blank_lines_and_bad_bytes() {
        // Quoted commas and doubled quotes, a field holding a newline (the record spans
        // lines 3-4), a blank line, LF and CRLF endings, no newline at the end.
        let rows = parse(
            "Obj-Class,Directory Name,Display Name\n\
             Mailbox,ann,\"Smith, Ann \"\"Annie\"\"\"\r\n\
             Mailbox,bob,\"Bob\nthe second\"\n\
             \n\
             Mailbox,cy,Cy",
        );
        let rows: Vec<Row> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3, 6]);
        let names: Vec<String> = rows
            .iter()
            .map(|r| match &r.change {
                Change::UpsertRecipient(f) => f.display_name.clone().unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["Smith, Ann \"Annie\"", "Bob\nthe second", "Cy"]);

        let mut bad = b"Obj-Class,Directory Name,Display Name\nMailbox,ann,A\n".to_vec();
        bad.extend_from_slice(b"Mailbox,bob,\xff\xfe\n");
        let rows: Vec<_> = CsvRows::new(&bad[..]).collect();
        assert!(rows[0].is_ok());
        let e = rows[1].as_ref().unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("field 3 is not UTF-8"), "{}", e.reason);
    }

    #[test]
    fn an_unterminated_quote_is_an_error_in_linear_time_and_bounded_memory() {
        // 200,000 lines after a quote that never closes: each line is looked at once,
        // and the record is cut off at RECORD_BYTES_MAX with the line it started on.
        let header = "Obj-Class,Mode,Directory Name\n";
        let mut text = format!("{header}Mailbox,Create,\"ann\n");
        for n in 0..200_000 {
            text.push_str(&format!("Mailbox,Create,user{n}\n"));
        }
        let errors: Vec<String> = parse(&text)
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors
                .first()
                .is_some_and(|e| e.starts_with("line 2:") && e.contains("still open")),
            "{:?}",
            errors.first()
        );
    }

    #[test]
    fn every_error_class_names_the_line_and_attribute() {
        let header = "Obj-Class,Mode,Directory Name,Hide From Address Book,Quota Warning\n";
        let cases = [
            ("", "line 1: the file is empty; it needs a header row"),
            (
                "Directory Name,Obj-Class\n",
                "line 1: the first column must be Obj-Class",
            ),
            (
                "Obj-Class,Directory Name,Colour\n",
                "line 1: attribute Colour: unknown attribute",
            ),
            (
                "Obj-Class,Display Name\n",
                "line 1: the header has no Directory Name column",
            ),
            (
                "Obj-Class,Directory Name,Directory Name\n",
                "line 1: attribute Directory Name: appears twice",
            ),
            (
                &format!("{header}Mailbox,Create,ann,TRUE\n"),
                "line 2: expected 5 fields like the header, found 4",
            ),
            (
                &format!("{header}Printer,Create,ann,TRUE,1\n"),
                "line 2: attribute Obj-Class: \"Printer\" is not Mailbox",
            ),
            (
                &format!("{header}Mailbox,Replace,ann,TRUE,1\n"),
                "line 2: attribute Mode: \"replace\" is not Create",
            ),
            (
                &format!("{header}Mailbox,Create,,TRUE,1\n"),
                "line 2: attribute Directory Name: is empty",
            ),
            (
                &format!("{header}Mailbox,Create,ann,maybe,1\n"),
                "line 2: attribute Hide From Address Book: \"maybe\" is not TRUE or FALSE",
            ),
            (
                &format!("{header}Mailbox,Create,ann,TRUE,lots\n"),
                "line 2: attribute Quota Warning: \"lots\" is not a whole number of KB",
            ),
            (
                &format!("{header}Mailbox,Create,~DEL,TRUE,1\n"),
                "line 2: attribute Directory Name: the key cannot be cleared",
            ),
        ];
        for (text, expected) in cases {
            let errors: Vec<String> = parse(text)
                .into_iter()
                .filter_map(Result::err)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.first().is_some_and(|e| e.starts_with(expected)),
                "{text:?}: {errors:?}"
            );
        }
        // A bad row does not stop the rows after it.
        let rows = parse(&format!(
            "{header}Mailbox,Create,ann,maybe,1\nMailbox,Create,bob,FALSE,2\n"
        ));
        assert!(rows[0].is_err() && rows[1].is_ok());
    }
}
