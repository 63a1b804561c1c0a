//! The last warnings and errors the server logged, for the dashboard's "recent errors".
//!
//! Why a tracing layer: every component already says what went wrong through `tracing`
//! (a refused spool commit, a next hop that failed, a stalled queue); keeping the last
//! of those lines in memory shows the administrator the same words the log has,
//! without reading the log file.

use mailroom_watch::RankedMutex;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Lines kept.
const KEPT: usize = 100;

/// One warning or error.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// When, Unix ms.
    pub at_ms: i64,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields.
    pub message: String,
}

/// The kept lines; clone the handle into the layer and the web state.
#[derive(Clone)]
pub struct RecentLog {
    lines: Arc<RankedMutex<VecDeque<LogLine>>>,
}

impl Default for RecentLog {
    fn default() -> Self {
        RecentLog {
            lines: Arc::new(RankedMutex::new(
                mailroom_watch::rank::RECENT_LOG,
                "recent log lines",
                VecDeque::with_capacity(KEPT),
            )),
        }
    }
}

impl RecentLog {
    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<LogLine> {
        self.lines.lock().iter().cloned().collect()
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for RecentLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let line = LogLine {
            at_ms: mailroom_watch::now_ms(),
            level: if level == Level::ERROR {
                "ERROR"
            } else {
                "WARN"
            },
            target: event.metadata().target().to_string(),
            message: message.0.chars().take(500).collect(),
        };
        let mut lines = self.lines.lock();
        if lines.len() == KEPT {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}
