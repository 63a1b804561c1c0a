//! The administrator's subcommands: each one is an admin API call and a readable print.

use anyhow::bail;
use clap::{Args, Subcommand};
use mailroom::client::{AdminClient, path_segment};
use mailroom_admin::{QueuesReport, RecipientRequest, RecipientView, RoutingReport};
use mailroom_directory::jobs::JobReport;
use mailroom_directory::routing::{AddressSpace, Connector, ConnectorKind};
use mailroom_directory::{Protocol, RecipientKind, SiteChange};
use mailroom_store::MessageSummary;
use serde_json::{Value, json};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

/// How the CLI reaches a server.
#[derive(Args, Clone)]
pub struct Target {
    /// Data folder of a local server (finds its admin API there).
    #[arg(long, default_value = "mailroom-data", global = true)]
    data: PathBuf,
    /// Admin API URL of a remote server (with --token).
    #[arg(long, global = true, requires = "token")]
    server: Option<String>,
    /// Admin API token of a remote server.
    #[arg(long, global = true, env = "MAILROOM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

impl Target {
    fn client(&self) -> anyhow::Result<AdminClient> {
        match (&self.server, &self.token) {
            (Some(server), Some(token)) => Ok(AdminClient::new(server, token)),
            _ => AdminClient::from_data_dir(&self.data),
        }
    }

    /// Prints `value` as JSON when asked, otherwise runs `table`.
    fn print<T: serde::Serialize>(&self, value: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            table(value);
        }
        Ok(())
    }
}

/// Fields shared by the commands that create or modify recipients.
#[derive(Args, Default)]
pub struct NameArgs {
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Given name (site addressing token %g).
    #[arg(long)]
    given: Option<String>,
    /// Surname (%s).
    #[arg(long)]
    surname: Option<String>,
    /// Initials (%i).
    #[arg(long)]
    initials: Option<String>,
    /// Hide from the address book (true/false).
    #[arg(long)]
    hidden: Option<bool>,
}

fn read_password() -> anyhow::Result<String> {
    let mut text = String::new();
    if std::io::stdin().is_terminal() {
        // On a terminal: not echoed, asked twice.
        text = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        if again != text {
            bail!("the two passwords differ; nothing changed");
        }
    } else {
        std::io::stdin().read_to_string(&mut text)?;
    }
    let password = text.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password)
}

/// `mailroom recipient ...`
#[derive(Subcommand)]
pub enum RecipientCommand {
    /// Create a mailbox. Without an address, site addressing generates one.
    Add {
        /// Primary SMTP address (optional when a template exists; then give --alias).
        address: Option<String>,
        /// Mailbox name (default: the address's local part).
        #[arg(long)]
        alias: Option<String>,
        /// Another address for the same mailbox (repeat for more).
        #[arg(long = "secondary", value_name = "ADDRESS")]
        secondary: Vec<String>,
        #[command(flatten)]
        names: NameArgs,
        /// Read an initial password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List recipients.
    List {
        /// Only this kind (mailbox, contact, list).
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Show one recipient (by alias or address).
    Show {
        /// Alias or address.
        recipient: String,
        #[command(flatten)]
        target: Target,
    },
    /// Change a recipient's fields.
    Modify {
        /// Alias or address.
        recipient: String,
        #[command(flatten)]
        names: NameArgs,
        /// Replace the addresses (`SMTP:` primary, `smtp:` secondary; repeat).
        #[arg(long = "address", value_name = "ADDRESS")]
        addresses: Vec<String>,
        /// Protocol override `imap:off`, `pop3:on`, `smtp:default` (repeat; replaces all).
        #[arg(long = "protocol", value_name = "PROTOCOL:STATE")]
        protocols: Vec<String>,
        /// Quota warning, KB (0: none).
        #[arg(long)]
        quota_warning: Option<u64>,
        /// Quota prohibit send, KB (0: none).
        #[arg(long)]
        quota_prohibit_send: Option<u64>,
        /// Quota prohibit send and receive, KB (0: none).
        #[arg(long)]
        quota_prohibit_send_receive: Option<u64>,
        /// Grant a mailbox "send as" this recipient (repeat; replaces the grants).
        #[arg(long = "send-as", value_name = "MAILBOX")]
        send_as: Vec<String>,
        /// Remove every "send as" grant.
        #[arg(long, conflicts_with = "send_as")]
        no_send_as: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a recipient (a mailbox's mail goes with it).
    Delete {
        /// Alias or address.
        recipient: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set a mailbox's password (from standard input, or a prompt on a terminal).
    Passwd {
        /// Alias or address.
        recipient: String,
        #[command(flatten)]
        target: Target,
    },
    /// Give a mailbox a role: `admin` may sign in to the web admin (at /login on the
    /// admin listener) with its address and password; `user` takes that away.
    Role {
        /// Alias or address.
        recipient: String,
        /// `admin` or `user`.
        #[arg(value_parser = ["admin", "user"])]
        role: String,
        #[command(flatten)]
        target: Target,
    },
}

fn names_into(request: &mut RecipientRequest, names: NameArgs) {
    request.display_name = names.name;
    request.given_name = names.given;
    request.surname = names.surname;
    request.initials = names.initials;
    request.hidden = names.hidden;
}

fn print_recipient(r: &RecipientView) {
    println!("{:<13} {}", "alias:", r.alias);
    println!("{:<13} {:?}", "kind:", r.kind);
    println!("{:<13} {}", "display name:", r.display_name);
    if !r.given_name.is_empty() || !r.surname.is_empty() {
        println!(
            "{:<13} {} {} ({})",
            "name:", r.given_name, r.surname, r.initials
        );
    }
    for a in &r.addresses {
        let marks = match (a.primary, a.generated) {
            (true, true) => "primary, generated",
            (true, false) => "primary",
            (false, true) => "generated",
            (false, false) => "",
        };
        println!(
            "{:<13} {} {}",
            "address:",
            a.address,
            if marks.is_empty() {
                String::new()
            } else {
                format!("({marks})")
            }
        );
    }
    if let Some(t) = &r.target_address {
        println!("{:<13} {t}", "target:");
    }
    if !r.members.is_empty() {
        println!("{:<13} {}", "members:", r.members.join(", "));
    }
    if !r.send_as.is_empty() {
        println!("{:<13} {}", "send as:", r.send_as.join(", "));
    }
    if let Some(o) = &r.owner {
        println!("{:<13} {o}", "owner:");
    }
    if !r.protocols.is_empty() {
        println!("{:<13} {}", "protocols:", r.protocols.join(", "));
    }
}

fn print_recipients(list: &Vec<RecipientView>) {
    println!(
        "{:<24} {:<8} {:<40} DISPLAY NAME",
        "ALIAS", "KIND", "PRIMARY ADDRESS"
    );
    for r in list {
        let kind = match r.kind {
            RecipientKind::Mailbox => "mailbox",
            RecipientKind::Contact => "contact",
            RecipientKind::List => "list",
        };
        println!(
            "{:<24} {:<8} {:<40} {}",
            r.alias,
            kind,
            r.primary_address.as_deref().unwrap_or(""),
            r.display_name
        );
    }
    println!("{} recipient(s)", list.len());
}

fn created(target: &Target, r: RecipientView) -> anyhow::Result<()> {
    target.print(&r, |r| {
        println!(
            "created {} (alias {})",
            r.primary_address.as_deref().unwrap_or("?"),
            r.alias
        );
        for note in &r.notes {
            println!("  note: {note}");
        }
    })
}

/// `mailroom recipient ...`
pub fn recipient(command: RecipientCommand) -> anyhow::Result<()> {
    match command {
        RecipientCommand::Add {
            address,
            alias,
            secondary,
            names,
            password_stdin,
            target,
        } => {
            let mut request = RecipientRequest {
                kind: Some(RecipientKind::Mailbox),
                address,
                alias,
                secondary_addresses: secondary,
                ..Default::default()
            };
            names_into(&mut request, names);
            if password_stdin {
                request.password = Some(read_password()?);
            }
            let r: RecipientView = target.client()?.post("/recipients", &request)?;
            created(&target, r)
        }
        RecipientCommand::List { kind, target } => {
            let path = match kind {
                Some(k) => format!("/recipients?kind={}", path_segment(&k)),
                None => "/recipients".into(),
            };
            let list: Vec<RecipientView> = target.client()?.get(&path)?;
            target.print(&list, print_recipients)
        }
        RecipientCommand::Show { recipient, target } => {
            let r: RecipientView = target
                .client()?
                .get(&format!("/recipients/{}", path_segment(&recipient)))?;
            target.print(&r, print_recipient)
        }
        RecipientCommand::Modify {
            recipient,
            names,
            addresses,
            protocols,
            quota_warning,
            quota_prohibit_send,
            quota_prohibit_send_receive,
            send_as,
            no_send_as,
            target,
        } => {
            let mut request = RecipientRequest {
                send_as: (no_send_as || !send_as.is_empty()).then_some(send_as),
                addresses: (!addresses.is_empty()).then_some(addresses),
                protocols: (!protocols.is_empty()).then_some(protocols),
                quota_warning_kb: quota_warning,
                quota_prohibit_send_kb: quota_prohibit_send,
                quota_prohibit_send_receive_kb: quota_prohibit_send_receive,
                ..Default::default()
            };
            names_into(&mut request, names);
            let r: RecipientView = target.client()?.patch(
                &format!("/recipients/{}", path_segment(&recipient)),
                &request,
            )?;
            target.print(&r, print_recipient)
        }
        RecipientCommand::Delete { recipient, target } => {
            target
                .client()?
                .delete(&format!("/recipients/{}", path_segment(&recipient)))?;
            println!("deleted {recipient}");
            Ok(())
        }
        RecipientCommand::Passwd { recipient, target } => {
            let password = read_password()?;
            target.client()?.post_no_content(
                &format!("/recipients/{}/password", path_segment(&recipient)),
                &json!({ "password": password }),
            )?;
            println!("password set for {recipient}");
            Ok(())
        }
        RecipientCommand::Role {
            recipient,
            role,
            target,
        } => {
            let view: RecipientView = target.client()?.patch(
                &format!("/recipients/{}", path_segment(&recipient)),
                &json!({ "admin": role == "admin" }),
            )?;
            target.print(&view, |view| {
                println!(
                    "{} is {}",
                    view.alias,
                    if view.admin {
                        "an administrator (may sign in to the web admin)"
                    } else {
                        "a user (no web admin)"
                    }
                )
            })
        }
    }
}

/// `mailroom contact ...`
#[derive(Subcommand)]
pub enum ContactCommand {
    /// Create a contact: mail to its local address goes to its external target.
    Add {
        /// Alias (the mailbox name).
        alias: String,
        /// The external address mail is sent on to.
        #[arg(long)]
        target_address: String,
        /// Its local address (default: generated by site addressing).
        #[arg(long)]
        address: Option<String>,
        #[command(flatten)]
        names: NameArgs,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom contact ...`
pub fn contact(command: ContactCommand) -> anyhow::Result<()> {
    let ContactCommand::Add {
        alias,
        target_address,
        address,
        names,
        target,
    } = command;
    let mut request = RecipientRequest {
        kind: Some(RecipientKind::Contact),
        alias: Some(alias),
        address,
        target_address: Some(target_address),
        ..Default::default()
    };
    names_into(&mut request, names);
    let r: RecipientView = target.client()?.post("/recipients", &request)?;
    created(&target, r)
}

/// `mailroom list ...`
#[derive(Subcommand)]
pub enum ListCommand {
    /// Create a distribution list.
    Add {
        /// Alias (the list's name).
        alias: String,
        /// Its address (default: generated by site addressing).
        #[arg(long)]
        address: Option<String>,
        /// A member, by alias or address (repeat).
        #[arg(long = "member")]
        members: Vec<String>,
        /// The owner, by alias or address.
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        names: NameArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Replace a list's members.
    Members {
        /// The list's alias.
        alias: String,
        /// Members, by alias or address.
        members: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom list ...`
pub fn list(command: ListCommand) -> anyhow::Result<()> {
    match command {
        ListCommand::Add {
            alias,
            address,
            members,
            owner,
            names,
            target,
        } => {
            let mut request = RecipientRequest {
                kind: Some(RecipientKind::List),
                alias: Some(alias),
                address,
                members: Some(members),
                owner,
                ..Default::default()
            };
            names_into(&mut request, names);
            let r: RecipientView = target.client()?.post("/recipients", &request)?;
            created(&target, r)
        }
        ListCommand::Members {
            alias,
            members,
            target,
        } => {
            let request = RecipientRequest {
                members: Some(members),
                ..Default::default()
            };
            let r: RecipientView = target
                .client()?
                .patch(&format!("/recipients/{}", path_segment(&alias)), &request)?;
            target.print(&r, |r| println!("{}: {}", r.alias, r.members.join(", ")))
        }
    }
}

/// `mailroom domain ...`
#[derive(Subcommand)]
pub enum DomainCommand {
    /// List accepted domains.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Accept mail for a domain.
    Add {
        /// The domain.
        domain: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop accepting mail for an explicitly added domain.
    Remove {
        /// The domain.
        domain: String,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom domain ...`
pub fn domain(command: DomainCommand) -> anyhow::Result<()> {
    match command {
        DomainCommand::List { target } => {
            let domains: Value = target.client()?.get("/domains")?;
            target.print(&domains, |d| {
                for domain in d["accepted"].as_array().into_iter().flatten() {
                    println!("{}", domain.as_str().unwrap_or(""));
                }
            })
        }
        DomainCommand::Add { domain, target } => {
            target
                .client()?
                .post_no_content("/domains", &json!({ "domain": domain }))?;
            println!("accepting mail for {domain}");
            Ok(())
        }
        DomainCommand::Remove { domain, target } => {
            target
                .client()?
                .delete(&format!("/domains/{}", path_segment(&domain)))?;
            println!("no longer accepting mail for {domain}");
            Ok(())
        }
    }
}

/// Applies a site change; returns the job it started, if any.
fn site_change(target: &Target, change: SiteChange) -> anyhow::Result<Option<u64>> {
    let report: Value = target.client()?.post("/site", &change)?;
    Ok(report["job"].as_u64())
}

/// Follows a job to its end with a progress bar; prints its summary and failures.
fn follow_job(target: &Target, id: u64) -> anyhow::Result<JobReport> {
    let client = target.client()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let report = loop {
        let report: JobReport = client.get(&format!("/jobs/{id}"))?;
        bar.set_length(report.total.max(report.scanned));
        bar.set_position(report.scanned);
        bar.set_message(if report.paced {
            format!("{} (yielding to mail)", report.kind)
        } else {
            report.kind.clone()
        });
        if report.state != "running" {
            break report;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    println!("job {} {}: {}", report.id, report.state, report.summary);
    for error in report.errors.iter().take(50) {
        println!("  {error}");
    }
    if report.errors.len() > 50 {
        println!(
            "  ... and {} more (mailroom job show {id} --json)",
            report.errors.len() - 50
        );
    }
    Ok(report)
}

/// `mailroom template ...`
#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Show the site addressing templates.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Set the SMTP template and regenerate every generated address (old addresses
    /// stay as secondary addresses; manual addresses are untouched).
    Set {
        /// The template, e.g. '%g.%s@example.com' (tokens %g %s %i %d %m %Ng %Ns %rxy %%).
        template: String,
        /// Do not wait for the regeneration job.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Remove the SMTP template (new recipients then need an address).
    Remove {
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom template ...`
pub fn template(command: TemplateCommand) -> anyhow::Result<()> {
    match command {
        TemplateCommand::Show { target } => {
            let site: Value = target.client()?.get("/site")?;
            target.print(&site["site"]["addressing"], |t| {
                for (kind, template) in t.as_object().into_iter().flatten() {
                    println!("{kind}: {}", template.as_str().unwrap_or(""));
                }
            })
        }
        TemplateCommand::Remove { target } => {
            site_change(
                &target,
                SiteChange::SetTemplate {
                    address_type: "SMTP".into(),
                    template: None,
                },
            )?;
            println!("SMTP template removed; existing addresses are unchanged");
            Ok(())
        }
        TemplateCommand::Set {
            template,
            no_wait,
            target,
        } => {
            let job = site_change(
                &target,
                SiteChange::SetTemplate {
                    address_type: "SMTP".into(),
                    template: Some(template.clone()),
                },
            )?;
            println!("SMTP template set to {template}");
            if let Some(id) = job {
                if no_wait {
                    println!("regeneration job {id} started (mailroom job show {id})");
                } else {
                    follow_job(&target, id)?;
                }
            }
            Ok(())
        }
    }
}

fn on_off(text: &str) -> anyhow::Result<bool> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "enabled" => Ok(true),
        "off" | "false" | "no" | "disabled" => Ok(false),
        other => bail!("{other:?}: say on or off"),
    }
}

fn parse_protocol(text: &str) -> anyhow::Result<Protocol> {
    Protocol::parse(text)
        .ok_or_else(|| anyhow::anyhow!("unknown protocol {text:?} (smtp, imap, pop3)"))
}

/// `mailroom protocol ...`
#[derive(Subcommand)]
pub enum ProtocolCommand {
    /// Show the site and server settings.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Turn a protocol on or off at site level.
    Site {
        /// smtp, imap or pop3.
        protocol: String,
        /// on or off.
        state: String,
        #[command(flatten)]
        target: Target,
    },
    /// This server: `site-defaults`, or `PROTOCOL on|off` for its own settings.
    Server {
        /// `site-defaults`, or a protocol.
        setting: String,
        /// on or off (with a protocol).
        state: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// May this recipient use this protocol on this server?
    Check {
        /// Alias or address.
        recipient: String,
        /// smtp, imap or pop3.
        protocol: String,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom protocol ...`
pub fn protocol(command: ProtocolCommand) -> anyhow::Result<()> {
    match command {
        ProtocolCommand::Show { target } => {
            let p: Value = target.client()?.get("/protocols")?;
            target.print(&p, |p| {
                let line = |set: &Value| {
                    ["smtp_submission", "imap", "pop3"]
                        .iter()
                        .map(|k| format!("{k}={}", if set[k] == true { "on" } else { "off" }))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!("site:             {}", line(&p["site"]));
                let server = &p["server"];
                println!(
                    "server {}: {} ({})",
                    server["name"].as_str().unwrap_or(""),
                    line(&server["effective"]),
                    if server["use_site_defaults"] == true {
                        "site defaults"
                    } else {
                        "own settings"
                    }
                );
            })
        }
        ProtocolCommand::Site {
            protocol,
            state,
            target,
        } => {
            site_change(
                &target,
                SiteChange::SetSiteProtocol {
                    protocol: parse_protocol(&protocol)?,
                    enabled: on_off(&state)?,
                },
            )?;
            println!("site: {protocol} {state}");
            Ok(())
        }
        ProtocolCommand::Server {
            setting,
            state,
            target,
        } => {
            let change = if setting == "site-defaults" {
                SiteChange::SetServerProtocol {
                    use_site_defaults: true,
                    protocol: None,
                }
            } else {
                let Some(state) = state else {
                    bail!("say on or off after the protocol");
                };
                SiteChange::SetServerProtocol {
                    use_site_defaults: false,
                    protocol: Some((parse_protocol(&setting)?, on_off(&state)?)),
                }
            };
            site_change(&target, change)?;
            println!("server protocol settings changed");
            Ok(())
        }
        ProtocolCommand::Check {
            recipient,
            protocol,
            target,
        } => {
            let answer: Value = target.client()?.get(&format!(
                "/protocols/check?recipient={}&protocol={}",
                path_segment(&recipient),
                path_segment(&protocol)
            ))?;
            target.print(&answer, |a| {
                println!(
                    "{} may {}use {}",
                    a["recipient"].as_str().unwrap_or(""),
                    if a["allowed"] == true { "" } else { "not " },
                    a["protocol"].as_str().unwrap_or("")
                )
            })
        }
    }
}

/// `mailroom connector ...`
#[derive(Subcommand)]
pub enum ConnectorCommand {
    /// List connectors.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show one connector.
    Show {
        /// Its name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Create or replace a connector.
    Add {
        /// Its name.
        name: String,
        /// Deliver to this smart host (host:port).
        #[arg(long, conflicts_with_all = ["mx", "local"])]
        smart_host: Option<String>,
        /// Deliver by DNS MX (the default).
        #[arg(long)]
        mx: bool,
        /// Deliver to this server's mailboxes.
        #[arg(long)]
        local: bool,
        /// An address space `TYPE:PATTERN` (repeat), e.g. 'SMTP:*@partner.example'.
        #[arg(long = "address-space", required = true)]
        address_spaces: Vec<String>,
        /// Cost of the address spaces, 1-100.
        #[arg(long, default_value_t = 1)]
        cost: u8,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// Its own retry schedule: minutes after the 1st, 2nd, ... failed attempt, the
        /// last repeating (e.g. 5,10,30); the server's outbound.retry_minutes otherwise.
        #[arg(long, value_delimiter = ',')]
        retry_minutes: Option<Vec<u64>>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a connector.
    Delete {
        /// Its name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Enable or disable a connector (routing skips disabled ones).
    State {
        /// Its name.
        name: String,
        /// enabled or disabled.
        state: String,
        #[command(flatten)]
        target: Target,
    },
    /// Add an address space to a connector.
    AddSpace {
        /// The connector.
        name: String,
        /// `TYPE:PATTERN`.
        space: String,
        /// Cost 1-100.
        #[arg(long, default_value_t = 1)]
        cost: u8,
        #[command(flatten)]
        target: Target,
    },
    /// Remove an address space (by pattern) from a connector.
    RemoveSpace {
        /// The connector.
        name: String,
        /// `TYPE:PATTERN` or `PATTERN`.
        space: String,
        #[command(flatten)]
        target: Target,
    },
}

fn print_connectors(list: &Vec<Connector>) {
    for c in list {
        println!(
            "{} — {}{}",
            c.name,
            c.kind.describe(),
            if c.enabled { "" } else { " (disabled)" }
        );
        for s in &c.address_spaces {
            println!("    {}:{}  cost {}", s.address_type, s.pattern, s.cost);
        }
    }
}

fn put(target: &Target, connector: &Connector) -> anyhow::Result<()> {
    let stored: Connector = target.client()?.post("/connectors", connector)?;
    target.print(&vec![stored], print_connectors)
}

fn fetch_connector(target: &Target, name: &str) -> anyhow::Result<Connector> {
    target
        .client()?
        .get(&format!("/connectors/{}", path_segment(name)))
}

/// `mailroom connector ...`
pub fn connector(command: ConnectorCommand) -> anyhow::Result<()> {
    match command {
        ConnectorCommand::List { target } => {
            let list: Vec<Connector> = target.client()?.get("/connectors")?;
            target.print(&list, print_connectors)
        }
        ConnectorCommand::Show { name, target } => {
            let c = fetch_connector(&target, &name)?;
            target.print(&vec![c], print_connectors)
        }
        ConnectorCommand::Add {
            name,
            smart_host,
            mx: _,
            local,
            address_spaces,
            cost,
            disabled,
            retry_minutes,
            target,
        } => {
            let kind = match (smart_host, local) {
                (Some(host), _) => ConnectorKind::SmartHost { host },
                (None, true) => ConnectorKind::Local,
                (None, false) => ConnectorKind::Mx,
            };
            let address_spaces = address_spaces
                .iter()
                .map(|s| {
                    AddressSpace::parse(s, cost)
                        .map_err(|e| anyhow::anyhow!("--address-space {s}: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            put(
                &target,
                &Connector {
                    name,
                    kind,
                    address_spaces,
                    enabled: !disabled,
                    retry_minutes,
                },
            )
        }
        ConnectorCommand::Delete { name, target } => {
            target
                .client()?
                .delete(&format!("/connectors/{}", path_segment(&name)))?;
            println!("deleted connector {name}");
            Ok(())
        }
        ConnectorCommand::State {
            name,
            state,
            target,
        } => {
            let mut c = fetch_connector(&target, &name)?;
            c.enabled = on_off(&state)?;
            put(&target, &c)
        }
        ConnectorCommand::AddSpace {
            name,
            space,
            cost,
            target,
        } => {
            let mut c = fetch_connector(&target, &name)?;
            c.address_spaces.push(
                AddressSpace::parse(&space, cost).map_err(|e| anyhow::anyhow!("{space}: {e}"))?,
            );
            put(&target, &c)
        }
        ConnectorCommand::RemoveSpace {
            name,
            space,
            target,
        } => {
            let mut c = fetch_connector(&target, &name)?;
            let wanted =
                AddressSpace::parse(&space, 1).map_err(|e| anyhow::anyhow!("{space}: {e}"))?;
            let before = c.address_spaces.len();
            c.address_spaces.retain(|s| {
                !(s.pattern.eq_ignore_ascii_case(&wanted.pattern)
                    && s.address_type.eq_ignore_ascii_case(&wanted.address_type))
            });
            if c.address_spaces.len() == before {
                bail!("connector {name} has no address space {space}");
            }
            put(&target, &c)
        }
    }
}

/// `mailroom routing ...`
#[derive(Subcommand)]
pub enum RoutingCommand {
    /// Print the routing table.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// What changed since the previous table.
    Diff {
        #[command(flatten)]
        target: Target,
    },
    /// Which connector mail to an address takes.
    Route {
        /// The address.
        address: String,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom routing ...`
pub fn routing(command: RoutingCommand) -> anyhow::Result<()> {
    match command {
        RoutingCommand::Show { target } => {
            let r: RoutingReport = target.client()?.get("/routing")?;
            target.print(&r, |r| print!("{}", r.table))
        }
        RoutingCommand::Diff { target } => {
            let r: RoutingReport = target.client()?.get("/routing")?;
            target.print(&r, |r| print!("{}", r.diff))
        }
        RoutingCommand::Route { address, target } => {
            let route: Value = target.client()?.get(&format!(
                "/routing/route?address={}",
                path_segment(&address)
            ))?;
            target.print(&route, |r| {
                println!(
                    "{address} -> {} (cost {}, matched {})",
                    r["connector"].as_str().unwrap_or(""),
                    r["cost"],
                    r["pattern"].as_str().unwrap_or("")
                )
            })
        }
    }
}

/// `mailroom directory ...`
#[derive(Subcommand)]
pub enum DirectoryCommand {
    /// Import recipients from a CSV or LDIF file (applies every valid row and reports
    /// the rest, unless --atomic).
    Import {
        /// The file.
        file: PathBuf,
        /// csv or ldif (default: from the file's extension).
        #[arg(long)]
        format: Option<String>,
        /// Only validate: report what would fail, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply every row or none.
        #[arg(long)]
        atomic: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Export every recipient (to standard output, or --output FILE).
    Export {
        /// csv (default) or ldif.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom directory ...`
pub fn directory(command: DirectoryCommand) -> anyhow::Result<()> {
    match command {
        DirectoryCommand::Import {
            file,
            format,
            dry_run,
            atomic,
            target,
        } => {
            let format = match format {
                Some(f) => f,
                None => mailroom_directory::bulk::Format::from_path(&file)
                    .map(|f| {
                        if f == mailroom_directory::bulk::Format::Csv {
                            "csv"
                        } else {
                            "ldif"
                        }
                        .to_string()
                    })
                    .ok_or_else(|| {
                        anyhow::anyhow!("{}: say --format csv or --format ldif", file.display())
                    })?,
            };
            let reader = std::fs::File::open(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("upload");
            let path = format!(
                "/directory/import?format={format}&dry_run={dry_run}&atomic={atomic}&name={}",
                path_segment(name)
            );
            let started: JobReport = target
                .client()?
                .post_stream(&path, std::io::BufReader::new(reader))?;
            let report = follow_job(&target, started.id)?;
            if report.failed > 0 || report.state != "done" {
                bail!("{} record(s) failed", report.failed);
            }
            Ok(())
        }
        DirectoryCommand::Export {
            format,
            output,
            target,
        } => {
            let text = target.client()?.get_text(&format!(
                "/directory/export?format={}",
                path_segment(&format)
            ))?;
            match output {
                Some(path) => std::fs::write(&path, text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}

/// `mailroom job ...`
#[derive(Subcommand)]
pub enum JobCommand {
    /// List jobs.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show one job (with its failures); follows it while it runs unless --json.
    Show {
        /// The job's number.
        id: u64,
        #[command(flatten)]
        target: Target,
    },
}

/// `mailroom job ...`
pub fn job(command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::List { target } => {
            let jobs: Vec<JobReport> = target.client()?.get("/jobs")?;
            target.print(&jobs, |jobs| {
                for j in jobs {
                    println!(
                        "{:>4}  {:<8} {:<24} scanned {} updated {} failed {}",
                        j.id, j.state, j.kind, j.scanned, j.updated, j.failed
                    );
                }
            })
        }
        JobCommand::Show { id, target } => {
            if target.json {
                let report: JobReport = target.client()?.get(&format!("/jobs/{id}"))?;
                return target.print(&report, |_| {});
            }
            follow_job(&target, id).map(|_| ())
        }
    }
}

/// `mailroom mailbox ...`
#[derive(Subcommand)]
pub enum MailboxCommand {
    /// List the messages in a recipient's INBOX.
    List {
        /// Alias or any address of the recipient.
        address: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC), for listings.
pub fn format_time(ms: i64) -> String {
    let t = mailroom_store::track::rfc3339(ms);
    format!("{} {}Z", &t[..10], &t[11..19])
}

/// `mailroom track`'s filters.
#[derive(Args)]
pub struct TrackArgs {
    /// The Message-ID header (with or without angle brackets).
    #[arg(long)]
    message_id: Option<String>,
    /// Part of the envelope sender.
    #[arg(long)]
    sender: Option<String>,
    /// Part of a recipient address: an envelope recipient, a list member, a mailbox.
    #[arg(long)]
    recipient: Option<String>,
    /// One queue identifier (as in the Received header and `queue` listings).
    #[arg(long)]
    queue_id: Option<String>,
    /// Only messages with an event since then: a time ago (`90s`, `30m`, `2h`, `7d`), a
    /// UTC date or time (`2026-12-01`, `2026-12-01T08:00:00Z`), or a Unix time.
    #[arg(long)]
    since: Option<String>,
    /// At most this many messages, newest first.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    target: Target,
}

/// `--since`: a time ago (`30m`) or a UTC date/time, as Unix ms.
pub fn parse_since(text: &str, now_ms: i64) -> anyhow::Result<i64> {
    let text = text.trim();
    let unit = |c: char| match c {
        's' => Some(1_000),
        'm' => Some(60_000),
        'h' => Some(3_600_000),
        'd' => Some(86_400_000),
        _ => None,
    };
    if let Some(last) = text.chars().last()
        && let Some(ms) = unit(last)
        && let Ok(n) = text[..text.len() - 1].parse::<i64>()
    {
        return Ok(now_ms - n * ms);
    }
    // A bare number: a Unix time (seconds, or milliseconds when that large).
    if let Ok(n) = text.parse::<i64>() {
        return Ok(if n >= 100_000_000_000 { n } else { n * 1000 });
    }
    // YYYY-MM-DD[THH:MM[:SS]][Z]
    let bad = || {
        anyhow::anyhow!(
            "--since {text:?}: give a time ago (90s, 30m, 2h, 7d), a UTC date or time \
             (2026-12-01, 2026-12-01T08:00:00Z) or a Unix time"
        )
    };
    let text = text.trim_end_matches('Z');
    let (date, time) = text.split_once(['T', ' ']).unwrap_or((text, "00:00:00"));
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (Some(Ok(y)), Some(Ok(m)), Some(Ok(day)), None) = (d.next(), d.next(), d.next(), d.next())
    else {
        return Err(bad());
    };
    let mut t = time.split(':').map(|p| p.parse::<i64>());
    let (h, min, sec) = match (t.next(), t.next(), t.next()) {
        (Some(Ok(h)), Some(Ok(min)), None) => (h, min, 0),
        (Some(Ok(h)), Some(Ok(min)), Some(Ok(sec))) => (h, min, sec),
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return Err(bad());
    }
    let days = mailroom_watch::civil::days_from_civil(y, m as u32, day as u32);
    Ok(((days * 86_400) + h * 3600 + min * 60 + sec) * 1000)
}

/// `mailroom track ...`: each matching message's trail.
pub fn track(args: TrackArgs) -> anyhow::Result<()> {
    let TrackArgs {
        message_id,
        sender,
        recipient,
        queue_id,
        since,
        limit,
        target,
    } = args;
    let mut query = vec![format!("limit={limit}")];
    let since_ms = since
        .map(|s| parse_since(&s, mailroom_watch::now_ms()))
        .transpose()?;
    for (key, value) in [
        ("message_id", message_id),
        ("sender", sender),
        ("recipient", recipient),
        ("queue_id", queue_id),
        ("since_ms", since_ms.map(|ms| ms.to_string())),
    ] {
        if let Some(value) = value {
            query.push(format!("{key}={}", path_segment(&value)));
        }
    }
    let events: Vec<mailroom_store::TrackEvent> = target
        .client()?
        .get(&format!("/track?{}", query.join("&")))?;
    target.print(&events, |events| {
        let mut current: Option<&str> = None;
        let mut messages = 0;
        for event in events {
            if current != Some(event.queue_id.as_str()) {
                current = Some(event.queue_id.as_str());
                messages += 1;
                println!(
                    "\n{}  <{}>  from <{}>",
                    event.queue_id,
                    event.message_id.as_deref().unwrap_or(""),
                    event.sender.as_deref().unwrap_or("")
                );
            }
            println!(
                "  {}  {:<11}  {}",
                format_time(event.at_ms),
                event.event.as_str(),
                event.summary()
            );
        }
        println!("\n{messages} message(s)");
    })
}

#[cfg(test)]
mod track_tests {
    use super::parse_since;

    #[test]
    fn since_takes_a_time_ago_or_a_utc_time_and_names_what_it_wants_otherwise() {
        let now = 1_796_180_645_678;
        assert_eq!(parse_since("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_since("7d", now).unwrap(), now - 7 * 86_400_000);
        assert_eq!(parse_since("2026-12-02", now).unwrap(), 1_796_169_600_000);
        assert_eq!(
            parse_since("2026-12-02T03:04:05Z", now).unwrap(),
            1_796_180_645_000
        );
        assert_eq!(
            parse_since("2000-02-29 00:00", now).unwrap(),
            951_782_400_000
        );
        assert_eq!(parse_since("1796180645", now).unwrap(), 1_796_180_645_000);
        assert_eq!(
            parse_since("1796180645678", now).unwrap(),
            1_796_180_645_678
        );
        let error = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(error.contains("--since"), "{error}");
        assert!(parse_since("2026-13-01", now).is_err());
    }
}

/// `mailroom mailbox ...`
pub fn mailbox(command: MailboxCommand) -> anyhow::Result<()> {
    let MailboxCommand::List { address, target } = command;
    let messages: Vec<MessageSummary> = target
        .client()?
        .get(&format!("/mailboxes/{}/messages", path_segment(&address)))?;
    target.print(&messages, |messages| {
        println!(
            "{:>6}  {:<20}  {:>8}  {:<30}  {:<40}  SUBJECT",
            "UID", "RECEIVED", "SIZE", "FROM", "MESSAGE-ID"
        );
        for m in messages {
            println!(
                "{:>6}  {:<20}  {:>8}  {:<30}  {:<40}  {}",
                m.uid,
                format_time(m.received_at_ms),
                m.size,
                m.from.as_deref().unwrap_or(""),
                m.message_id.as_deref().unwrap_or(""),
                m.subject.as_deref().unwrap_or("")
            );
        }
        println!("{} message(s)", messages.len());
    })
}

/// `mailroom queue ...`
#[derive(Subcommand)]
pub enum QueueCommand {
    /// Each queue's depth and oldest entry, and the quarantined messages.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// The entries of one queue (inbound, outbound, quarantine, undeliverable).
    Show {
        /// The queue.
        queue: String,
        #[command(flatten)]
        target: Target,
    },
    /// Entries matching every filter given, oldest first.
    Entries {
        /// Only this queue (inbound, outbound, quarantine, undeliverable).
        #[arg(long)]
        queue: Option<String>,
        /// held, deferred (tried, waiting) or active (not held).
        #[arg(long)]
        state: Option<String>,
        /// Connector name or recipient domain.
        #[arg(long)]
        destination: Option<String>,
        /// Part of the envelope sender.
        #[arg(long)]
        sender: Option<String>,
        /// Part of an envelope recipient.
        #[arg(long)]
        recipient: Option<String>,
        /// Only entries accepted at least this many seconds ago.
        #[arg(long)]
        older_than: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        target: Target,
    },
    /// One entry: envelope, each recipient's status and last reply, attempts, schedule.
    Entry {
        /// The entry's number (first column of `queue entries`).
        id: i64,
        #[command(flatten)]
        target: Target,
    },
    /// Makes an entry due now (a quarantined message goes back to conversion).
    Retry {
        /// The entry's number.
        id: i64,
        #[command(flatten)]
        target: Target,
    },
    /// Holds an entry: it is not attempted until released.
    Hold {
        /// The entry's number.
        id: i64,
        #[command(flatten)]
        target: Target,
    },
    /// Releases a held entry.
    Release {
        /// The entry's number.
        id: i64,
        #[command(flatten)]
        target: Target,
    },
    /// Removes an entry; with --dsn the sender is told (a failure DSN).
    Delete {
        /// The entry's number.
        id: i64,
        /// Send the sender a delivery status notification for the recipients not yet
        /// delivered.
        #[arg(long)]
        dsn: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Shows or sets the transfer mode: both, inbound, outbound or none.
    TransferMode {
        /// The new mode; none given shows the current one.
        mode: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

fn print_entries(items: &[mailroom_store::QueueItemInfo]) {
    println!(
        "{:>8}  {:<13} {:<6} {:>8}  {:<20} {:<28} RECIPIENTS",
        "ID", "QUEUE", "HELD", "TRIES", "NEXT ATTEMPT", "SENDER"
    );
    for item in items {
        println!(
            "{:>8}  {:<13} {:<6} {:>8}  {:<20} {:<28} {}",
            item.id,
            item.queue.as_str(),
            if item.held { "held" } else { "" },
            item.attempts,
            format_time(item.next_attempt_at_ms),
            format!("<{}>", item.mail_from),
            item.recipients.join(", ")
        );
    }
    println!("{} entr(ies)", items.len());
}

fn print_entry(item: &mailroom_store::QueueItemInfo) {
    println!("{:<14} {}", "entry:", item.id);
    println!("{:<14} {}", "queue:", item.queue.as_str());
    println!("{:<14} {}", "queue id:", item.queue_id);
    println!("{:<14} <{}>", "sender:", item.mail_from);
    println!("{:<14} {}", "received:", format_time(item.received_at_ms));
    println!("{:<14} {} bytes", "size:", item.size);
    println!("{:<14} {}", "attempts:", item.attempts);
    println!(
        "{:<14} {}",
        "next attempt:",
        format_time(item.next_attempt_at_ms)
    );
    println!("{:<14} {}", "held:", if item.held { "yes" } else { "no" });
    if let Some(c) = &item.connector {
        println!(
            "{:<14} {c} (routing generation {})",
            "connector:",
            item.generation.unwrap_or(0)
        );
    }
    if let Some(e) = &item.last_error {
        println!("{:<14} {e}", "last error:");
    }
    if let Some(env_id) = &item.envelope.env_id {
        println!("{:<14} {env_id}", "envelope id:");
    }
    println!("recipients:");
    for r in &item.envelope.recipients {
        println!(
            "  {:<32} {:<10} {}{}",
            r.address,
            format!("{:?}", r.status).to_lowercase(),
            r.reply.as_deref().unwrap_or(""),
            r.remote_mta
                .as_deref()
                .map(|m| format!(" (from {m})"))
                .unwrap_or_default()
        );
    }
}

/// `mailroom queue ...`
pub fn queue(command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::List { target } => {
            let report: QueuesReport = target.client()?.get("/queues")?;
            target.print(&report, |report| {
                println!(
                    "{:<14} {:>8} {:>12} {:>12}",
                    "QUEUE", "DEPTH", "BYTES", "OLDEST"
                );
                for q in &report.queues {
                    let oldest = q
                        .oldest_age_seconds
                        .map_or("-".to_string(), |s| format!("{s:.1}s"));
                    println!(
                        "{:<14} {:>8} {:>12} {:>12}",
                        q.summary.queue.as_str(),
                        q.summary.depth,
                        q.summary.bytes,
                        oldest
                    );
                }
                if !report.quarantine.is_empty() {
                    println!("\nQuarantined:");
                    for item in &report.quarantine {
                        println!(
                            "  {}  from <{}>  received {}  attempts {}\n    reason: {}",
                            item.queue_id,
                            item.mail_from,
                            format_time(item.received_at_ms),
                            item.attempts,
                            item.last_error.as_deref().unwrap_or("")
                        );
                    }
                }
            })
        }
        QueueCommand::Show { queue, target } => {
            let items: Vec<mailroom_store::QueueItemInfo> = target
                .client()?
                .get(&format!("/queues/{}/items", path_segment(&queue)))?;
            target.print(&items, |items| {
                for item in items {
                    println!(
                        "{}  from <{}>  to {}  {} bytes  received {}{}{}",
                        item.queue_id,
                        item.mail_from,
                        item.recipients.join(", "),
                        item.size,
                        format_time(item.received_at_ms),
                        item.connector
                            .as_deref()
                            .map(|c| format!(
                                "  via {c} (generation {})",
                                item.generation.unwrap_or(0)
                            ))
                            .unwrap_or_default(),
                        item.last_error
                            .as_deref()
                            .map(|e| format!("\n    {e}"))
                            .unwrap_or_default()
                    );
                }
                println!("{} entr(ies)", items.len());
            })
        }
        QueueCommand::Entries {
            queue,
            state,
            destination,
            sender,
            recipient,
            older_than,
            limit,
            target,
        } => {
            let mut query = vec![format!("limit={limit}")];
            for (key, value) in [
                ("queue", queue),
                ("state", state),
                ("destination", destination),
                ("sender", sender),
                ("recipient", recipient),
                ("older_than_secs", older_than.map(|s| s.to_string())),
            ] {
                if let Some(value) = value {
                    query.push(format!("{key}={}", path_segment(&value)));
                }
            }
            let items: Vec<mailroom_store::QueueItemInfo> = target
                .client()?
                .get(&format!("/queue?{}", query.join("&")))?;
            target.print(&items, |items| print_entries(items))
        }
        QueueCommand::Entry { id, target } => {
            let item: mailroom_store::QueueItemInfo =
                target.client()?.get(&format!("/queue/{id}"))?;
            target.print(&item, print_entry)
        }
        QueueCommand::Retry { id, target } => {
            let item: mailroom_store::QueueItemInfo = target
                .client()?
                .post(&format!("/queue/{id}/retry"), &serde_json::json!({}))?;
            target.print(&item, |item| {
                println!(
                    "entry {} is due now ({} queue)",
                    item.id,
                    item.queue.as_str()
                )
            })
        }
        QueueCommand::Hold { id, target } => {
            let item: mailroom_store::QueueItemInfo = target
                .client()?
                .post(&format!("/queue/{id}/hold"), &serde_json::json!({}))?;
            target.print(&item, |item| println!("entry {} is held", item.id))
        }
        QueueCommand::Release { id, target } => {
            let item: mailroom_store::QueueItemInfo = target
                .client()?
                .post(&format!("/queue/{id}/release"), &serde_json::json!({}))?;
            target.print(&item, |item| println!("entry {} is released", item.id))
        }
        QueueCommand::Delete { id, dsn, target } => {
            target.client()?.delete(&format!("/queue/{id}?dsn={dsn}"))?;
            if dsn {
                println!("entry {id} deleted; the sender is told");
            } else {
                println!("entry {id} deleted");
            }
            Ok(())
        }
        QueueCommand::TransferMode { mode, target } => {
            let client = target.client()?;
            let report: serde_json::Value = match mode {
                None => client.get("/transfer-mode")?,
                Some(mode) => client.post("/transfer-mode", &serde_json::json!({"mode": mode}))?,
            };
            target.print(&report, |r| {
                println!("transfer mode: {}", r["mode"].as_str().unwrap_or("?"))
            })
        }
    }
}

/// `mailroom backup DIR`: the running server copies its database, as of one moment,
/// into DIR (on its machine) while mail flows.
pub fn backup(dir: PathBuf, target: Target) -> anyhow::Result<()> {
    let dir = std::path::absolute(&dir)?;
    let manifest: mailroom_store::BackupManifest =
        target.client()?.post("/backup", &json!({ "dir": dir }))?;
    target.print(&manifest, |m| {
        println!(
            "Backed up into {}: {} message(s) in {} folder(s), {} recipient(s), {} queue entr(ies), {} bytes, schema version {}.",
            dir.display(),
            m.messages,
            m.folders,
            m.recipients,
            m.queue_entries,
            m.bytes,
            m.schema_version
        );
        println!(
            "Restore with: mailroom restore {} --data NEW-DATA-FOLDER",
            dir.display()
        );
    })
}

/// `mailroom restore DIR --data DATA`: brings a backup back into an empty data folder.
/// No server may be running on it; the next `serve` migrates an older schema.
pub fn restore(dir: PathBuf, data: PathBuf) -> anyhow::Result<()> {
    if data.exists() && std::fs::read_dir(&data)?.next().is_some() {
        bail!(
            "the data folder {} is not empty; restore only into a new or empty folder (move the old one aside first)",
            data.display()
        );
    }
    std::fs::create_dir_all(&data)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
    }
    let database = data.join("mailroom.db");
    let manifest = mailroom_store::SqliteStore::restore_from(&dir, &database)
        .map_err(|e| anyhow::anyhow!("cannot restore from {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o600))?;
    }
    println!(
        "Restored {} message(s) in {} folder(s), {} recipient(s) and {} queue entr(ies) into {}; start it with: mailroom serve --data {}",
        manifest.messages,
        manifest.folders,
        manifest.recipients,
        manifest.queue_entries,
        data.display(),
        data.display()
    );
    Ok(())
}
