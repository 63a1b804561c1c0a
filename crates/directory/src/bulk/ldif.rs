//! LDIF (RFC 2849): content records and change records (`changetype: add`, `modify`,
//! `delete`, `modrdn`/`moddn`), base64 values (`attr:: ...`), folded lines, comments.
//!
//! A recipient's DN is `cn=<alias>,ou=Recipients,o=<organization>`; only the first RDN
//! matters on import. Attributes: `objectClass` (`mailroomMailbox`, `mailroomContact`,
//! `mailroomList`; also `person`, `inetOrgPerson`, `user`, `contact`, `groupOfNames`,
//! `group`), `cn`, `displayName`, `givenName`, `sn`, `initials`, `mail` (the primary
//! address), `proxyAddresses` (`SMTP:` primary, `smtp:` secondary), `targetAddress`,
//! `member` (DNs or aliases), `owner`, `hideFromAddressBook`, `protocolSettings`
//! (`imap:off`), and the classic quota attributes `mDBStorageQuota` (warning),
//! `mDBOverQuotaLimit` (prohibit send) and `mDBOverHardQuotaLimit` (prohibit send and
//! receive), in KB. A content record (no `changetype`) creates or updates.

use super::{Row, RowError, parse_bool, parse_kb};
use crate::Snapshot;
use crate::model::{Recipient, RecipientKind};
use crate::writer::{Change, RecipientFields};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};

/// The LDIF attribute behind a directory field name (for error messages).
pub fn attribute_of(field: &str) -> &'static str {
    match field {
        "alias" => "cn",
        "display_name" => "displayName",
        "given_name" => "givenName",
        "surname" => "sn",
        "initials" => "initials",
        "addresses" | "address" | "secondary_addresses" => "proxyAddresses",
        "target_address" => "targetAddress",
        "members" => "member",
        "owner" => "owner",
        "protocols" => "protocolSettings",
        "kind" => "objectClass",
        _ => "",
    }
}

/// Longest line an export writes before folding (RFC 2849 recommends 76).
const FOLD_AT: usize = 76;

/// One `attr: value` line of a record.
struct Line {
    number: u64,
    name: String,
    value: String,
}

/// Streams rows out of an LDIF file.
pub struct LdifRows<R: Read> {
    lines: std::io::Lines<BufReader<R>>,
    number: u64,
    /// A physical line read ahead while unfolding.
    lookahead: Option<(u64, String)>,
    pending: VecDeque<Result<Row, RowError>>,
    deferred: Vec<Row>,
    finished: bool,
    seen_record: bool,
}

impl<R: Read> LdifRows<R> {
    /// Reads LDIF from `reader`.
    pub fn new(reader: R) -> LdifRows<R> {
        LdifRows {
            lines: BufReader::new(reader).lines(),
            number: 0,
            lookahead: None,
            pending: VecDeque::new(),
            deferred: Vec::new(),
            finished: false,
            seen_record: false,
        }
    }

    fn physical(&mut self) -> Option<Result<(u64, String), RowError>> {
        if let Some(line) = self.lookahead.take() {
            return Some(Ok(line));
        }
        let line = self.lines.next()?;
        self.number += 1;
        Some(match line {
            Ok(text) => Ok((self.number, text.trim_end_matches('\r').to_string())),
            Err(e) => Err(RowError {
                line: self.number,
                attribute: String::new(),
                reason: format!("unreadable line: {e}"),
            }),
        })
    }

    /// The next logical line (folds joined); `Some(None)` for a record separator.
    fn logical(&mut self) -> Option<Result<Option<(u64, String)>, RowError>> {
        loop {
            let (number, mut text) = match self.physical()? {
                Ok(line) => line,
                Err(e) => return Some(Err(e)),
            };
            if text.is_empty() {
                return Some(Ok(None));
            }
            // Unfold: a following line that starts with one space continues this one.
            loop {
                match self.physical() {
                    Some(Ok((n, next))) if next.starts_with(' ') => {
                        let _ = n;
                        text.push_str(&next[1..]);
                    }
                    Some(Ok(other)) => {
                        self.lookahead = Some(other);
                        break;
                    }
                    Some(Err(e)) => return Some(Err(e)),
                    None => break,
                }
            }
            if text.starts_with('#') {
                continue;
            }
            return Some(Ok(Some((number, text))));
        }
    }

    /// The next record's lines; `None` at the end of the file.
    fn record(&mut self) -> Option<Result<Vec<Line>, RowError>> {
        let mut lines = Vec::new();
        loop {
            match self.logical() {
                None if lines.is_empty() => return None,
                None => return Some(Ok(lines)),
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(None)) if lines.is_empty() => continue,
                Some(Ok(None)) => return Some(Ok(lines)),
                Some(Ok(Some((number, text)))) => match split(number, &text) {
                    Ok(line) => {
                        if !self.seen_record
                            && lines.is_empty()
                            && line.name.eq_ignore_ascii_case("version")
                        {
                            if line.value.trim() != "1" {
                                return Some(Err(RowError {
                                    line: number,
                                    attribute: "version".into(),
                                    reason: format!(
                                        "LDIF version {} is not supported (1)",
                                        line.value
                                    ),
                                }));
                            }
                            continue;
                        }
                        lines.push(line);
                    }
                    Err(e) => {
                        // Skip the rest of the broken record.
                        while let Some(Ok(Some(_))) = self.logical() {}
                        return Some(Err(e));
                    }
                },
            }
        }
    }
}

fn split(number: u64, text: &str) -> Result<Line, RowError> {
    let err = |attribute: &str, reason: String| RowError {
        line: number,
        attribute: attribute.to_string(),
        reason,
    };
    if text == "-" {
        return Ok(Line {
            number,
            name: "-".into(),
            value: String::new(),
        });
    }
    let Some((name, rest)) = text.split_once(':') else {
        return Err(err("", format!("{text:?} is not attribute: value")));
    };
    let name = name.split(';').next().unwrap_or(name).trim().to_string();
    let value = if let Some(encoded) = rest.strip_prefix(':') {
        let bytes = BASE64
            .decode(encoded.trim())
            .map_err(|e| err(&name, format!("bad base64: {e}")))?;
        String::from_utf8(bytes)
            .map_err(|_| err(&name, "the base64 value is not UTF-8 text".into()))?
    } else if rest.starts_with('<') {
        return Err(err(
            &name,
            "values by URL (attr:< url) are not supported".into(),
        ));
    } else {
        rest.trim_start_matches(' ').to_string()
    };
    Ok(Line {
        number,
        name,
        value,
    })
}

/// The alias in a DN: the value of its first RDN, unescaped.
fn alias_of_dn(dn: &str) -> Option<String> {
    let (_, rest) = dn.split_once('=')?;
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let a = chars.next()?;
                if a.is_ascii_hexdigit() && chars.peek().is_some_and(|b| b.is_ascii_hexdigit()) {
                    let b = chars.next()?;
                    out.push(u8::from_str_radix(&format!("{a}{b}"), 16).ok()? as char);
                } else {
                    out.push(a);
                }
            }
            ',' | '+' => break,
            _ => out.push(c),
        }
    }
    let out = out.trim().to_string();
    (!out.is_empty()).then_some(out)
}

/// A member or owner value: a DN, or an alias as it is.
fn reference(value: &str) -> String {
    if value.contains('=') {
        alias_of_dn(value).unwrap_or_else(|| value.to_string())
    } else {
        value.trim().to_string()
    }
}

fn kind_of(classes: &[String]) -> Option<RecipientKind> {
    let has = |names: &[&str]| {
        classes
            .iter()
            .any(|c| names.iter().any(|n| c.eq_ignore_ascii_case(n)))
    };
    if has(&[
        "mailroomList",
        "groupOfNames",
        "groupOfUniqueNames",
        "group",
    ]) {
        Some(RecipientKind::List)
    } else if has(&["mailroomContact", "contact", "mailroomRemote"]) {
        Some(RecipientKind::Contact)
    } else if has(&[
        "mailroomMailbox",
        "person",
        "inetOrgPerson",
        "organizationalPerson",
        "user",
    ]) {
        Some(RecipientKind::Mailbox)
    } else {
        None
    }
}

/// How a modify block treats one attribute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Set,
    Add,
    Delete,
}

/// Applies one attribute's values to `fields`. `members` collects member values so that
/// content records can defer them.
fn assign(
    fields: &mut RecipientFields,
    members: &mut Option<Vec<String>>,
    mail: &mut Option<String>,
    op: Op,
    name: &str,
    values: &[String],
    line: u64,
) -> Result<(), RowError> {
    let err = |reason: String| RowError {
        line,
        attribute: name.to_string(),
        reason,
    };
    let single = || -> Result<String, RowError> {
        match (op, values) {
            (Op::Delete, _) => Ok(String::new()),
            (_, [one]) => Ok(one.clone()),
            (_, []) => Err(err("needs a value".into())),
            _ => Err(err("takes one value".into())),
        }
    };
    let kb = || -> Result<Option<u64>, RowError> {
        let value = single()?;
        if value.is_empty() {
            return Ok(Some(0));
        }
        parse_kb(&value).map(Some).map_err(err)
    };
    match name.to_ascii_lowercase().as_str() {
        "objectclass" => {
            if op == Op::Set {
                fields.kind = Some(kind_of(values).ok_or_else(|| {
                    err(format!(
                        "none of {values:?} is a recipient class (mailroomMailbox, mailroomContact, mailroomList)"
                    ))
                })?);
            }
        }
        "cn" => {
            let alias = single()?;
            if alias.is_empty() {
                return Err(err("the key cannot be cleared".into()));
            }
            fields.alias = Some(alias);
        }
        "displayname" => fields.display_name = Some(single()?),
        "givenname" => fields.given_name = Some(single()?),
        "sn" => fields.surname = Some(single()?),
        "initials" => fields.initials = Some(single()?),
        "mail" => {
            if op != Op::Set {
                return Err(err("change the primary address with proxyAddresses".into()));
            }
            *mail = Some(single()?);
        }
        "proxyaddresses" => match op {
            Op::Set => fields.addresses = Some(values.to_vec()),
            Op::Add => fields.add_addresses.extend(values.iter().cloned()),
            Op::Delete if values.is_empty() => fields.addresses = Some(Vec::new()),
            Op::Delete => fields.remove_addresses.extend(values.iter().cloned()),
        },
        "targetaddress" => fields.target_address = Some(single()?),
        "member" | "uniquemember" => {
            let values: Vec<String> = values.iter().map(|v| reference(v)).collect();
            match op {
                Op::Set => *members = Some(values),
                Op::Add => fields.add_members.extend(values),
                Op::Delete if values.is_empty() => fields.members = Some(Vec::new()),
                Op::Delete => fields.remove_members.extend(values),
            }
        }
        "owner" | "managedby" => fields.owner = Some(reference(&single()?)),
        "hidefromaddressbook" | "msexchhidefromaddresslists" => {
            let value = single()?;
            fields.hidden = Some(if value.is_empty() {
                false
            } else {
                parse_bool(&value).map_err(err)?
            });
        }
        "protocolsettings" => match op {
            Op::Set => fields.protocols = Some(values.to_vec()),
            Op::Delete if values.is_empty() => fields.protocols = Some(Vec::new()),
            _ => return Err(err("use replace for protocolSettings".into())),
        },
        "mdbstoragequota" => fields.quota_warning_kb = kb()?,
        "mdboverquotalimit" => fields.quota_prohibit_send_kb = kb()?,
        "mdboverhardquotalimit" => fields.quota_prohibit_send_receive_kb = kb()?,
        _ => return Err(err("unknown attribute".into())),
    }
    Ok(())
}

/// Groups consecutive lines of the same attribute: `(name, values, first line)`.
fn grouped(lines: &[Line]) -> Vec<(String, Vec<String>, u64)> {
    let mut out: Vec<(String, Vec<String>, u64)> = Vec::new();
    for line in lines {
        match out
            .iter_mut()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(&line.name))
        {
            Some((_, values, _)) => values.push(line.value.clone()),
            None => out.push((line.name.clone(), vec![line.value.clone()], line.number)),
        }
    }
    out
}

fn merge_mail(fields: &mut RecipientFields, mail: Option<String>) {
    let Some(mail) = mail.filter(|m| !m.is_empty()) else {
        return;
    };
    let mut addresses: Vec<String> = fields
        .addresses
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            !super::super::strip_proxy_prefix(a)
                .0
                .eq_ignore_ascii_case(&mail)
        })
        .map(|a| {
            let (address, _) = super::super::strip_proxy_prefix(&a);
            format!("smtp:{address}")
        })
        .collect();
    addresses.insert(0, format!("SMTP:{mail}"));
    fields.addresses = Some(addresses);
}

impl<R: Read> LdifRows<R> {
    fn convert(&mut self, lines: Vec<Line>) -> Result<Vec<Row>, RowError> {
        let first = lines.first().expect("records are not empty");
        let line = first.number;
        let err = |attribute: &str, reason: String| RowError {
            line,
            attribute: attribute.to_string(),
            reason,
        };
        if !first.name.eq_ignore_ascii_case("dn") {
            return Err(err("dn", "every record starts with dn:".into()));
        }
        let alias = alias_of_dn(&first.value)
            .ok_or_else(|| err("dn", format!("{:?} has no RDN value", first.value)))?;
        let mut rest = &lines[1..];
        let changetype = match rest.first() {
            Some(l) if l.name.eq_ignore_ascii_case("changetype") => {
                rest = &rest[1..];
                l.value.trim().to_ascii_lowercase()
            }
            _ => "content".to_string(),
        };
        let row = |change: Change, deferred: bool| Row {
            line,
            alias: alias.clone(),
            change,
            deferred,
        };
        match changetype.as_str() {
            "delete" => Ok(vec![row(
                Change::DeleteRecipient {
                    alias: alias.clone(),
                },
                false,
            )]),
            "modrdn" | "moddn" => {
                let get = |name: &str| {
                    rest.iter()
                        .find(|l| l.name.eq_ignore_ascii_case(name))
                        .map(|l| l.value.trim().to_string())
                };
                let new = get("newrdn")
                    .and_then(|r| alias_of_dn(&r))
                    .ok_or_else(|| err("newrdn", "is missing or has no value".into()))?;
                if get("deleteoldrdn").as_deref() != Some("1") {
                    return Err(err(
                        "deleteoldrdn",
                        "must be 1: a recipient has one name".into(),
                    ));
                }
                if get("newsuperior").is_some() {
                    return Err(err(
                        "newsuperior",
                        "recipients cannot move to another container".into(),
                    ));
                }
                let fields = RecipientFields {
                    alias: Some(new),
                    ..RecipientFields::default()
                };
                Ok(vec![row(
                    Change::ModifyRecipient {
                        alias: alias.clone(),
                        fields,
                    },
                    false,
                )])
            }
            "modify" => {
                let mut fields = RecipientFields::default();
                let mut members = None;
                let mut mail = None;
                let mut index = 0;
                while index < rest.len() {
                    let op_line = &rest[index];
                    let op = match op_line.name.to_ascii_lowercase().as_str() {
                        "add" => Op::Add,
                        "replace" => Op::Set,
                        "delete" => Op::Delete,
                        other => {
                            return Err(err(other, "expected add:, replace: or delete:".into()));
                        }
                    };
                    let attribute = op_line.value.trim().to_string();
                    let end = rest[index + 1..]
                        .iter()
                        .position(|l| l.name == "-")
                        .map_or(rest.len(), |p| index + 1 + p);
                    let values: Vec<String> = rest[index + 1..end]
                        .iter()
                        .map(|l| {
                            if l.name.eq_ignore_ascii_case(&attribute) {
                                Ok(l.value.clone())
                            } else {
                                Err(RowError {
                                    line: l.number,
                                    attribute: l.name.clone(),
                                    reason: format!("inside a change of {attribute}"),
                                })
                            }
                        })
                        .collect::<Result<_, _>>()?;
                    assign(
                        &mut fields,
                        &mut members,
                        &mut mail,
                        op,
                        &attribute,
                        &values,
                        op_line.number,
                    )?;
                    if attribute.eq_ignore_ascii_case("cn") {
                        return Err(err("cn", "rename with changetype: modrdn".into()));
                    }
                    index = end + 1;
                }
                if members.is_some() {
                    fields.members = members;
                }
                Ok(vec![row(
                    Change::ModifyRecipient {
                        alias: alias.clone(),
                        fields,
                    },
                    false,
                )])
            }
            "add" | "content" => {
                let mut fields = RecipientFields::default();
                let mut members = None;
                let mut mail = None;
                for (name, values, number) in grouped(rest) {
                    if name.eq_ignore_ascii_case("changetype") {
                        return Err(RowError {
                            line: number,
                            attribute: name,
                            reason: "must come right after dn:".into(),
                        });
                    }
                    assign(
                        &mut fields,
                        &mut members,
                        &mut mail,
                        Op::Set,
                        &name,
                        &values,
                        number,
                    )?;
                }
                merge_mail(&mut fields, mail);
                // Owners, like members, may name records further down the file.
                let fields_owner = fields.owner.take();
                if fields.kind.is_none() {
                    return Err(err("objectClass", "is missing: say what the recipient is (mailroomMailbox, mailroomContact, mailroomList)".into()));
                }
                match &fields.alias {
                    Some(cn) if !cn.eq_ignore_ascii_case(&alias) => {
                        return Err(err("cn", format!("{cn:?} differs from the dn's {alias:?}")));
                    }
                    _ => fields.alias = Some(alias.clone()),
                }
                let change = if changetype == "add" {
                    Change::CreateRecipient(fields)
                } else {
                    Change::UpsertRecipient(fields)
                };
                let mut rows = vec![row(change, false)];
                let owner = fields_owner;
                if members.is_some() || owner.is_some() {
                    self.deferred.push(row(
                        Change::ModifyRecipient {
                            alias: alias.clone(),
                            fields: RecipientFields {
                                members,
                                owner,
                                ..RecipientFields::default()
                            },
                        },
                        true,
                    ));
                }
                Ok(std::mem::take(&mut rows))
            }
            other => Err(err(
                "changetype",
                format!("{other:?} is not add, modify, delete or modrdn"),
            )),
        }
    }
}

impl<R: Read> Iterator for LdifRows<R> {
    type Item = Result<Row, RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(item) = self.pending.pop_front() {
            return Some(item);
        }
        if self.finished {
            return None;
        }
        match self.record() {
            None => {
                self.finished = true;
                self.pending
                    .extend(std::mem::take(&mut self.deferred).into_iter().map(Ok));
                self.pending.pop_front()
            }
            Some(Err(e)) => Some(Err(e)),
            Some(Ok(lines)) => {
                self.seen_record = true;
                match self.convert(lines) {
                    Ok(rows) => {
                        self.pending.extend(rows.into_iter().map(Ok));
                        self.pending.pop_front()
                    }
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }
}

/// Writes `name: value`, base64 when the value is not a SAFE-STRING, folded at 76.
fn attribute(out: &mut String, name: &str, value: &str) {
    let safe = value
        .bytes()
        .all(|b| (1..=127).contains(&b) && b != b'\n' && b != b'\r')
        && !value.starts_with([' ', ':', '<'])
        && !value.ends_with(' ');
    let line = if safe {
        format!("{name}: {value}")
    } else {
        format!("{name}:: {}", BASE64.encode(value.as_bytes()))
    };
    let mut rest = line.as_str();
    let mut first = true;
    while !rest.is_empty() {
        let width = if first { FOLD_AT } else { FOLD_AT - 1 };
        let mut cut = rest.len().min(width);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if !first {
            out.push(' ');
        }
        out.push_str(&rest[..cut]);
        out.push('\n');
        rest = &rest[cut..];
        first = false;
    }
}

fn escape_rdn(value: &str) -> String {
    let mut out = String::new();
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == value.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn dn(alias: &str, base: &str) -> String {
    format!("cn={},{base}", escape_rdn(alias))
}

fn class_of(r: &Recipient) -> &'static str {
    match r.kind {
        RecipientKind::Mailbox => "mailroomMailbox",
        RecipientKind::Contact => "mailroomContact",
        RecipientKind::List => "mailroomList",
    }
}

/// Exports every recipient as content records, sorted by alias.
pub fn export(snapshot: &Snapshot) -> String {
    let organization = &snapshot.topology().organization;
    let base = format!(
        "ou=Recipients,o={}",
        escape_rdn(if organization.is_empty() {
            "Mailroom"
        } else {
            organization
        })
    );
    let alias_of = |id: i64| {
        snapshot
            .recipient(id)
            .map(|m| m.alias.clone())
            .unwrap_or_default()
    };
    let mut out = String::from("version: 1\n");
    for r in snapshot.recipients_by_alias() {
        out.push('\n');
        attribute(&mut out, "dn", &dn(&r.alias, &base));
        attribute(&mut out, "objectClass", "top");
        attribute(&mut out, "objectClass", class_of(&r));
        attribute(&mut out, "cn", &r.alias);
        for (name, value) in [
            ("displayName", &r.display_name),
            ("givenName", &r.given_name),
            ("sn", &r.surname),
            ("initials", &r.initials),
        ] {
            if !value.is_empty() {
                attribute(&mut out, name, value);
            }
        }
        if let Some(primary) = r.primary_address() {
            attribute(&mut out, "proxyAddresses", &format!("SMTP:{primary}"));
        }
        for a in r.addresses.iter().filter(|a| !a.primary) {
            attribute(&mut out, "proxyAddresses", &format!("smtp:{}", a.address));
        }
        if let Some(target) = &r.target_address {
            attribute(&mut out, "targetAddress", &format!("SMTP:{target}"));
        }
        for member in &r.members {
            attribute(&mut out, "member", &dn(&alias_of(*member), &base));
        }
        if let Some(owner) = r.owner {
            attribute(&mut out, "owner", &dn(&alias_of(owner), &base));
        }
        if r.hidden {
            attribute(&mut out, "hideFromAddressBook", "TRUE");
        }
        for setting in r.protocols.to_csv() {
            attribute(&mut out, "protocolSettings", &setting);
        }
        for (name, value) in [
            ("mDBStorageQuota", r.quota.warning_kb),
            ("mDBOverQuotaLimit", r.quota.prohibit_send_kb),
            ("mDBOverHardQuotaLimit", r.quota.prohibit_send_receive_kb),
        ] {
            if let Some(kb) = value {
                attribute(&mut out, name, &kb.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Result<Row, RowError>> {
        LdifRows::new(text.as_bytes()).collect()
    }

    #[test]
    fn records_of_every_changetype() {
        let text = "version: 1\n\
# a comment\n\
\x20that continues\n\
\n\
dn: cn=team,ou=Recipients,o=Org\n\
objectClass: top\n\
objectClass: mailroomList\n\
member: cn=ann,ou=Recipients,o=Org\n\
member: bob\n\
proxyAddresses: SMTP:team@x.test\n\
\n\
dn: cn=ann,ou=Recipients,o=Org\n\
changetype: add\n\
objectClass: inetOrgPerson\n\
displayName:: Sm9zw6kgTWFyw61h\n\
mail: ann@x.test\n\
proxyAddresses: smtp:a@x.test\n\
description-free: no\n\
\n\
dn: cn=bob,ou=Recipients,o=Org\n\
changetype: modify\n\
replace: displayName\n\
displayName: Robert\n\
-\n\
add: proxyAddresses\n\
proxyAddresses: smtp:rob\n\
\x20ert@x.test\n\
-\n\
delete: mDBStorageQuota\n\
-\n\
\n\
dn: cn=old,ou=Recipients,o=Org\n\
changetype: delete\n\
\n\
dn: cn=bob,ou=Recipients,o=Org\n\
changetype: modrdn\n\
newrdn: cn=robert\n\
deleteoldrdn: 1\n";
        let rows = parse(text);
        assert!(rows[0].is_ok());
        let err = rows[1].as_ref().unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 18: attribute description-free: unknown attribute"
        );
        let rows: Vec<Row> = rows.into_iter().filter_map(Result::ok).collect();
        assert_eq!(
            rows.iter().map(|r| r.line).collect::<Vec<_>>(),
            [5, 20, 32, 35, 5]
        );
        let Change::UpsertRecipient(team) = &rows[0].change else {
            panic!()
        };
        assert_eq!(team.kind, Some(RecipientKind::List));
        assert_eq!(team.members, None, "deferred");
        let Change::ModifyRecipient { alias, fields } = &rows[1].change else {
            panic!()
        };
        assert_eq!(alias, "bob");
        assert_eq!(fields.display_name.as_deref(), Some("Robert"));
        assert_eq!(
            fields.add_addresses,
            ["smtp:robert@x.test"],
            "folded value joined"
        );
        assert_eq!(fields.quota_warning_kb, Some(0));
        assert!(matches!(&rows[2].change, Change::DeleteRecipient { alias } if alias == "old"));
        let Change::ModifyRecipient { fields, .. } = &rows[3].change else {
            panic!()
        };
        assert_eq!(fields.alias.as_deref(), Some("robert"));
        let Change::ModifyRecipient { alias, fields } = &rows[4].change else {
            panic!()
        };
        assert!(rows[4].deferred);
        assert_eq!(alias, "team");
        assert_eq!(
            fields.members.as_deref(),
            Some(&["ann".to_string(), "bob".to_string()][..])
        );
    }

    #[test]
    fn base64_mail_and_every_error_class() {
        let rows = parse(
            "dn: cn=ann,o=x\nobjectClass: person\ndisplayName:: Sm9zw6kgTWFyw61h\nmail: ann@x.test\nproxyAddresses: SMTP:old@x.test\n",
        );
        let Change::UpsertRecipient(f) = &rows[0].as_ref().unwrap().change else {
            panic!()
        };
        assert_eq!(f.display_name.as_deref(), Some("José María"));
        assert_eq!(
            f.addresses.as_deref(),
            Some(&["SMTP:ann@x.test".to_string(), "smtp:old@x.test".to_string()][..])
        );
        let cases = [
            (
                "version: 2\n",
                "line 1: attribute version: LDIF version 2 is not supported",
            ),
            (
                "cn: ann\n",
                "line 1: attribute dn: every record starts with dn:",
            ),
            (
                "dn: cn=ann\nno colon here\n",
                "line 2: \"no colon here\" is not attribute: value",
            ),
            (
                "dn: cn=ann\nobjectClass: person\ndisplayName:: ***\n",
                "line 3: attribute displayName: bad base64",
            ),
            (
                "dn: cn=ann\nobjectClass: person\njpegPhoto:< file:///x\n",
                "line 3: attribute jpegPhoto: values by URL",
            ),
            (
                "dn: cn=ann\ndisplayName: Ann\n",
                "line 1: attribute objectClass: is missing",
            ),
            (
                "dn: cn=ann\nobjectClass: printer\n",
                "line 2: attribute objectClass: none of",
            ),
            (
                "dn: cn=ann\nobjectClass: person\ncn: bob\n",
                "line 1: attribute cn: \"bob\" differs",
            ),
            (
                "dn: cn=ann\nchangetype: rename\n",
                "line 1: attribute changetype: \"rename\" is not add",
            ),
            (
                "dn: cn=ann\nchangetype: modify\nfrobnicate: sn\n",
                "line 1: attribute frobnicate: expected add:",
            ),
            (
                "dn: cn=ann\nchangetype: modify\nreplace: sn\ngivenName: x\n-\n",
                "line 4: attribute givenName: inside a change of sn",
            ),
            (
                "dn: cn=ann\nchangetype: modrdn\nnewrdn: cn=b\ndeleteoldrdn: 0\n",
                "line 1: attribute deleteoldrdn: must be 1",
            ),
            (
                "dn: cn=ann\nobjectClass: person\nmDBStorageQuota: big\n",
                "line 3: attribute mDBStorageQuota: \"big\" is not a whole number",
            ),
            (
                "dn: cn=ann\nobjectClass: person\nsn: a\nsn: b\n",
                "line 3: attribute sn: takes one value",
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
    }

    #[test]
    fn escaping_and_folding() {
        assert_eq!(
            alias_of_dn("cn=Smith\\, John,ou=x"),
            Some("Smith, John".into())
        );
        assert_eq!(alias_of_dn("cn=a\\2Cb,ou=x"), Some("a,b".into()));
        assert_eq!(escape_rdn("Smith, John"), "Smith\\, John");
        let mut out = String::new();
        attribute(&mut out, "description", &"x".repeat(200));
        assert!(out.lines().all(|l| l.len() <= FOLD_AT));
        assert_eq!(out.lines().count(), 3);
        let mut out = String::new();
        attribute(&mut out, "sn", "Núñez");
        assert_eq!(out, "sn:: TsO6w7Fleg==\n");
    }
}
