//! Connectors and the routing table (the classic GWART).
//!
//! Every connector contributes address spaces: `(type, pattern, cost, scope)`. The table
//! compiled from them answers "which connector carries mail to this address?":
//!
//! 1. Preference by how the pattern matches the whole address: an exact address first,
//!    then wildcard patterns (`*` any run, `%` one character) with the most literal
//!    characters, then a partial match (a domain pattern matching the address's domain
//!    or a parent of it, by whole labels: `sea.com` covers `x.sea.com`, not
//!    `chelsea.com`), then the type-only pattern `*`.
//! 2. Within the most preferred group that has one: unavailable connectors are skipped,
//!    then the lowest cost wins; equal costs are balanced by a per-message key.
//! 3. A route that had to skip a cheaper unavailable connector says so
//!    ([`Route::instead_of`]), so falling back is never silent; with
//!    `only_least_cost_routes` it does not happen at all.
//!
//! The table is rebuilt with every directory snapshot that changes a connector; the text
//! form is what `mailroom routing show` prints and `routing diff` compares.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

/// How a connector delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConnectorKind {
    /// SMTP to the hosts named by the destination domain's MX records.
    Mx,
    /// SMTP to one smart host (`host:port`).
    SmartHost {
        /// Where to connect.
        host: String,
    },
    /// Delivery to this server's own mailboxes.
    Local,
}

impl ConnectorKind {
    /// Short text for tables.
    pub fn describe(&self) -> String {
        match self {
            ConnectorKind::Mx => "SMTP by DNS MX".into(),
            ConnectorKind::SmartHost { host } => format!("SMTP to smart host {host}"),
            ConnectorKind::Local => "local".into(),
        }
    }
}

/// Where an address space is visible (kept for the classic model; one site today).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The whole organization.
    #[default]
    Organization,
    /// This site only.
    Site,
    /// One location within the site.
    Location,
}

/// One address space of a connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressSpace {
    /// Address type; `SMTP` for Internet mail.
    #[serde(default = "smtp")]
    pub address_type: String,
    /// The pattern: an address, a wildcard pattern, a domain, or `*`.
    pub pattern: String,
    /// 1 (preferred) to 100 (last resort).
    pub cost: u8,
    /// Visibility.
    #[serde(default)]
    pub scope: Scope,
}

fn smtp() -> String {
    "SMTP".into()
}

impl AddressSpace {
    /// Parses the CLI form `TYPE:PATTERN` (e.g. `SMTP:*@partner.example`); a missing type
    /// means SMTP.
    pub fn parse(text: &str, cost: u8) -> Result<AddressSpace, String> {
        let (address_type, pattern) = match text.split_once(':') {
            Some((t, p)) if !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()) => {
                (t.to_ascii_uppercase(), p.to_string())
            }
            _ => ("SMTP".to_string(), text.to_string()),
        };
        let space = AddressSpace {
            address_type,
            pattern,
            cost,
            scope: Scope::Organization,
        };
        space.check()?;
        Ok(space)
    }

    /// Checks cost and pattern.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=100).contains(&self.cost) {
            return Err(format!("cost {} is outside 1-100", self.cost));
        }
        if self.pattern.trim().is_empty() {
            return Err("the pattern is empty".into());
        }
        if self
            .pattern
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "the pattern {:?} contains white space",
                self.pattern
            ));
        }
        Ok(())
    }
}

/// A connector: a way out, with the address spaces it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connector {
    /// Unique name.
    pub name: String,
    /// How it delivers.
    #[serde(flatten)]
    pub kind: ConnectorKind,
    /// What it serves.
    pub address_spaces: Vec<AddressSpace>,
    /// An administratively disabled connector is skipped by routing.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Minutes to wait after the 1st, 2nd, ... failed attempt through this connector
    /// (the last repeats); none: the server's `outbound.retry_minutes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_minutes: Option<Vec<u64>>,
}

fn yes() -> bool {
    true
}

/// How a pattern matches, most preferred first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Exact,
    Wildcard,
    Partial,
    TypeOnly,
}

impl Class {
    fn of(pattern: &str) -> Class {
        if pattern == "*" {
            Class::TypeOnly
        } else if pattern.contains(['*', '%']) {
            Class::Wildcard
        } else if pattern.contains('@') {
            Class::Exact
        } else {
            Class::Partial
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Exact => "exact",
            Class::Wildcard => "wildcard",
            Class::Partial => "partial",
            Class::TypeOnly => "type",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    address_type: String,
    pattern: String,
    class: Class,
    /// Literal characters (wildcards excluded): more is more specific.
    literals: usize,
    cost: u8,
    connector: String,
    available: bool,
}

impl Row {
    /// Sort key: preference, then specificity (descending), then cost, then name.
    fn key(&self) -> (Class, std::cmp::Reverse<usize>, u8, &str, &str) {
        (
            self.class,
            std::cmp::Reverse(self.literals),
            self.cost,
            &self.connector,
            &self.pattern,
        )
    }

    fn matches(&self, address: &str) -> bool {
        match self.class {
            Class::TypeOnly => true,
            Class::Exact => self.pattern == address,
            Class::Wildcard => glob(self.pattern.as_bytes(), address.as_bytes()),
            Class::Partial => {
                let domain = address.rsplit_once('@').map_or(address, |(_, d)| d);
                domain == self.pattern
                    || domain
                        .strip_suffix(&self.pattern)
                        .is_some_and(|head| head.ends_with('.'))
            }
        }
    }
}

/// `*` matches any run (also empty), `%` exactly one character; the whole text must match.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'%' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The connector chosen for an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The connector's name.
    pub connector: String,
    /// The cost of the address space used.
    pub cost: u8,
    /// The pattern that matched.
    pub pattern: String,
    /// When a cheaper matching connector was unavailable: its name.
    pub instead_of: Option<String>,
}

/// The compiled routing table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutingTable {
    rows: Vec<Row>,
    only_least_cost: bool,
}

impl RoutingTable {
    /// Compiles the table from every connector's address spaces.
    pub fn compile(
        connectors: &BTreeMap<String, Connector>,
        only_least_cost: bool,
    ) -> RoutingTable {
        let mut rows: Vec<Row> = connectors
            .values()
            .flat_map(|connector| {
                connector.address_spaces.iter().map(move |space| {
                    let pattern = space.pattern.to_lowercase();
                    Row {
                        address_type: space.address_type.to_ascii_uppercase(),
                        class: Class::of(&pattern),
                        literals: pattern.chars().filter(|c| *c != '*' && *c != '%').count(),
                        pattern,
                        cost: space.cost,
                        connector: connector.name.clone(),
                        available: connector.enabled,
                    }
                })
            })
            .collect();
        rows.sort_by(|a, b| a.key().cmp(&b.key()));
        RoutingTable {
            rows,
            only_least_cost,
        }
    }

    /// True when no connector has an address space.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The connector for `address`; `balance` spreads equal-cost routes (use something
    /// per message, such as a hash of its queue id). `None`: no usable route.
    pub fn route(&self, address_type: &str, address: &str, balance: u64) -> Option<Route> {
        let address = address.to_lowercase();
        let matching: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.address_type.eq_ignore_ascii_case(address_type) && r.matches(&address))
            .collect();
        // Rows are sorted, so each (class, specificity) group is contiguous.
        let mut start = 0;
        while start < matching.len() {
            let head = matching[start];
            let end = start
                + matching[start..]
                    .iter()
                    .take_while(|r| r.class == head.class && r.literals == head.literals)
                    .count();
            let group = &matching[start..end];
            let cheapest = group.iter().map(|r| r.cost).min().unwrap_or(u8::MAX);
            let usable: Vec<&&Row> = group
                .iter()
                .filter(|r| r.available && (!self.only_least_cost || r.cost == cheapest))
                .collect();
            if let Some(cost) = usable.iter().map(|r| r.cost).min() {
                let ties: Vec<&&Row> = usable.iter().copied().filter(|r| r.cost == cost).collect();
                let chosen = ties[(balance % ties.len() as u64) as usize];
                let instead_of = (cost > cheapest).then(|| {
                    group
                        .iter()
                        .find(|r| r.cost == cheapest)
                        .map(|r| r.connector.clone())
                        .unwrap_or_default()
                });
                return Some(Route {
                    connector: chosen.connector.clone(),
                    cost,
                    pattern: chosen.pattern.clone(),
                    instead_of,
                });
            }
            start = end;
        }
        None
    }

    /// The table as text, most preferred rows first (what `routing show` prints).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<6} {:<40} {:>4}  {:<9} {:<24} STATE",
            "TYPE", "ADDRESS SPACE", "COST", "MATCH", "CONNECTOR"
        );
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<6} {:<40} {:>4}  {:<9} {:<24} {}",
                row.address_type,
                row.pattern,
                row.cost,
                row.class.name(),
                row.connector,
                if row.available {
                    "available"
                } else {
                    "disabled"
                }
            );
        }
        if self.only_least_cost {
            out.push_str("(only least-cost routes are used)\n");
        }
        out
    }
}

/// A line diff of two rendered tables: `- ` lines left the table, `+ ` lines joined it.
pub fn diff(previous: &str, current: &str) -> String {
    let old: Vec<&str> = previous.lines().skip(1).collect();
    let new: Vec<&str> = current.lines().skip(1).collect();
    let mut out = String::new();
    for line in &old {
        if !new.contains(line) {
            let _ = writeln!(out, "- {line}");
        }
    }
    for line in &new {
        if !old.contains(line) {
            let _ = writeln!(out, "+ {line}");
        }
    }
    if out.is_empty() {
        out.push_str("(no changes)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(name: &str, spaces: &[(&str, u8)], enabled: bool) -> Connector {
        Connector {
            name: name.into(),
            kind: ConnectorKind::Mx,
            address_spaces: spaces
                .iter()
                .map(|(p, c)| AddressSpace::parse(p, *c).unwrap())
                .collect(),
            enabled,
            retry_minutes: None,
        }
    }

    fn table(connectors: Vec<Connector>, only_least_cost: bool) -> RoutingTable {
        let map = connectors
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        RoutingTable::compile(&map, only_least_cost)
    }

    fn via(t: &RoutingTable, address: &str) -> Option<String> {
        t.route("SMTP", address, 0).map(|r| r.connector)
    }

    #[test]
    fn glob_matching() {
        for (pattern, text, expected) in [
            ("*@a.com", "x@a.com", true),
            ("*@a.com", "x@b.com", false),
            ("*@*.a.com", "x@y.a.com", true),
            ("*@*.a.com", "x@a.com", false),
            ("j%e@a.com", "joe@a.com", true),
            ("j%e@a.com", "jooe@a.com", false),
            ("*", "", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
        ] {
            assert_eq!(
                glob(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} {text}"
            );
        }
    }

    #[test]
    fn preference_exact_then_wildcard_then_partial_then_type() {
        let t = table(
            vec![
                connector("internet", &[("SMTP:*", 1)], true),
                connector("partial", &[("SMTP:sea.com", 1)], true),
                connector("wild", &[("SMTP:*@sales.sea.com", 1)], true),
                connector("wilder", &[("SMTP:*@*.sea.com", 1)], true),
                connector("exact", &[("SMTP:boss@sales.sea.com", 5)], true),
            ],
            false,
        );
        // Exact wins even at a higher cost.
        assert_eq!(via(&t, "boss@sales.sea.com").as_deref(), Some("exact"));
        // The wildcard with more literal characters wins.
        assert_eq!(via(&t, "ann@sales.sea.com").as_deref(), Some("wild"));
        assert_eq!(via(&t, "ann@support.sea.com").as_deref(), Some("wilder"));
        // A partial match by whole labels, before the type-only route.
        assert_eq!(via(&t, "ann@sea.com").as_deref(), Some("partial"));
        assert_eq!(via(&t, "ann@chelsea.com").as_deref(), Some("internet"));
        assert_eq!(
            via(&t, "ANN@SEA.COM").as_deref(),
            Some("partial"),
            "case-insensitive"
        );
        assert_eq!(
            t.route("X400", "ann@sea.com", 0),
            None,
            "other address types"
        );
    }

    #[test]
    fn cost_balancing_and_unavailable_connectors() {
        let t = table(
            vec![
                connector("a", &[("*@p.example", 1)], true),
                connector("b", &[("*@p.example", 1)], true),
                connector("c", &[("*@p.example", 5)], true),
                connector("down", &[("*@q.example", 1)], false),
                connector("backup", &[("*@q.example", 9)], true),
                connector("dead", &[("*@r.example", 1)], false),
            ],
            false,
        );
        let picks: std::collections::BTreeSet<String> = (0..4)
            .map(|k| t.route("SMTP", "x@p.example", k).unwrap().connector)
            .collect();
        assert_eq!(
            picks,
            ["a", "b"].map(String::from).into(),
            "equal costs are balanced"
        );
        let fallback = t.route("SMTP", "x@q.example", 0).unwrap();
        assert_eq!(fallback.connector, "backup");
        assert_eq!(
            fallback.instead_of.as_deref(),
            Some("down"),
            "fallback is reported"
        );
        assert_eq!(t.route("SMTP", "x@r.example", 0), None, "no usable route");

        let strict = table(
            vec![
                connector("down", &[("*@q.example", 1)], false),
                connector("backup", &[("*@q.example", 9)], true),
                connector("internet", &[("*", 50)], true),
            ],
            true,
        );
        // Only least-cost routes: the costlier one in the group is not used, but a less
        // specific group still is.
        assert_eq!(via(&strict, "x@q.example").as_deref(), Some("internet"));
    }

    #[test]
    fn render_and_diff() {
        let before = table(vec![connector("internet", &[("*", 10)], true)], false);
        let after = table(
            vec![
                connector("internet", &[("*", 10)], true),
                connector("partner", &[("*@partner.example", 1)], true),
            ],
            false,
        );
        let text = after.render();
        assert!(
            text.lines().nth(1).unwrap().contains("*@partner.example"),
            "{text}"
        );
        let d = diff(&before.render(), &text);
        assert_eq!(d.lines().count(), 1, "{d}");
        assert!(d.starts_with("+ SMTP   *@partner.example"), "{d}");
        assert_eq!(diff(&text, &text), "(no changes)\n");
    }

    #[test]
    fn address_space_parsing() {
        assert_eq!(
            AddressSpace::parse("SMTP:*@a.b", 1).unwrap().pattern,
            "*@a.b"
        );
        assert_eq!(
            AddressSpace::parse("*@a.b", 1).unwrap().address_type,
            "SMTP"
        );
        assert!(AddressSpace::parse("*", 0).unwrap_err().contains("1-100"));
        assert!(AddressSpace::parse("*", 101).is_err());
    }
}
